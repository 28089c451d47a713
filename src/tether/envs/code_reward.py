"""A reward function for code: does the completion's code pass its row's tests in the sandbox.

    tether grpo ... --reward-fn tether.envs.code_reward:code_tests_reward

The prompts file has a `tests` column: asserts (one string, or a list of them) that the code must
pass, e.g. {"prompt": "Write add(a, b).", "tests": "assert add(2, 3) == 5"}.

A pass is the tests running to their end, not just exit status 0: code that calls exit(0) or
os._exit(0) before the tests run would otherwise be a cheap way to the reward for a policy to
learn. So the solution and then the tests run, as a module named `solution` (an `if __name__ ==
"__main__":` block does not run), under a small harness that prints a random token, read from
stdin before the solution starts, only after the tests. Code that digs the token out of the
harness's frame (sys._getframe) still gets past this; it is meant against the easy shortcut.
"""

from __future__ import annotations

import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from tether.envs.sandbox import run_python

CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)

HARNESS = """import io, sys
token = sys.stdin.readline()
namespace = {{"__name__": "solution"}}
sys.stdout = io.StringIO()  # the solution's prints cannot push the token out of the kept output
try:
    exec(compile({solution!r}, "solution.py", "exec"), namespace)
    exec(compile({tests!r}, "tests.py", "exec"), namespace)
except SystemExit:  # an exit before the tests end is no pass, whatever its status
    sys.exit(1)
sys.__stdout__.write(token)
"""


def extract_code(completion: Any) -> Optional[str]:
    """The last ```python (or ```py) block of a completion, else its last untagged ``` block, else
    None. A conversational completion ([{"role", "content"}]) gives its last message's content."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    blocks = CODE_BLOCK.findall(completion)
    tagged = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    untagged = [body for tag, body in blocks if not tag]
    return (tagged or untagged or [None])[-1]


class CodeTestsReward:
    """A tether reward function (TRL's signature): 1.0 when the completion's code, followed by
    its row's `tests` (asserts), runs to the end in the sandbox (module docstring), else 0.0;
    None for a row without tests. The runs go in parallel, at most max_workers at a time.

        tether grpo ... --reward-fn tether.envs.code_reward:code_tests_reward
    """

    def __init__(self, *, max_workers: int = 4, timeout_s: float = 5.0, memory_mb: int = 512):
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers}; give at least 1")
        self.max_workers, self.timeout_s, self.memory_mb = max_workers, timeout_s, memory_mb

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 tests: Sequence[Any], **columns) -> list[Optional[float]]:
        programs = [self.program(c, t) for c, t in zip(completions, tests)]
        work = [p for p in programs if p]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, len(work)))) as pool:
            passed = iter(pool.map(self.passes, work))
        return [None if p is None else (1.0 if p and next(passed) else 0.0) for p in programs]

    @staticmethod
    def program(completion: Any, tests: Any) -> Optional[str]:
        """The harness around the completion's code and the tests ("" when the completion has no
        code block), or None for a row without tests."""
        if isinstance(tests, (list, tuple)):
            tests = "\n".join(tests)
        if not tests or not str(tests).strip():
            return None
        code = extract_code(completion)
        return "" if code is None else HARNESS.format(solution=code, tests=str(tests))

    def passes(self, program: str) -> bool:
        token = secrets.token_hex(16) + "\n"
        result = run_python(program, stdin=token, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return result.ok and result.stdout.endswith(token)


code_tests_reward = CodeTestsReward()
