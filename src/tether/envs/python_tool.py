"""The built-in `python` tool: the policy's code runs in the sandbox (envs/sandbox.py), and what
it printed comes back as the tool's result.

    tether grpo ... --env tether.envs.python_tool:PythonTool

The policy calls it as any tool (envs/tools.py):

    <tool_call>{"name": "python", "arguments": {"code": "print(2 ** 10)"}}</tool_call>

and reads `1024` in the tool's response. Code that crashes shows its traceback's last lines; code
the sandbox stops (time, memory, processes, a refused file or socket) shows why, and the episode
goes on. Subclass `PythonTool` to pay the final answer (`ToolEnv.reward`) or to change the
limits (`timeout_s`, `memory_mb`).
"""

from __future__ import annotations

from tether.envs.sandbox import run_python
from tether.envs.tools import ToolEnv

TIMEOUT_S = 5.0
MEMORY_MB = 512
MAX_RESULT_CHARS = 2000


def python(code: str) -> str:
    """Run a Python program in a sandbox (no network, no files outside its own directory) and
    return what it printed.

    Args:
        code: the program; print what you want to see
    """
    return sandboxed(code, TIMEOUT_S, MEMORY_MB)


def sandboxed(code: str, timeout_s: float, memory_mb: int) -> str:
    """The tool's answer: stdout, then the end of stderr when the code failed, then why the
    sandbox stopped it, if it did (cut to MAX_RESULT_CHARS)."""
    result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
    out = result.stdout
    if result.returncode != 0 and result.stderr:
        out += ("\n" if out else "") + "\n".join(result.stderr.strip().splitlines()[-3:])
    if result.killed_reason:
        out += ("\n" if out else "") + f"[stopped: {result.killed_reason}]"
    out = out.strip() or "(no output)"
    return out if len(out) <= MAX_RESULT_CHARS else out[:MAX_RESULT_CHARS] + " [cut]"


class PythonTool(ToolEnv):
    """A tool-calling environment whose one tool is `python`."""

    tools = (python,)
    max_tool_calls = 8
