"""The sandbox for model-written Python: each escape attempt is stopped, the caller goes on, and
nothing is left behind. Each test runs under every layer set that should stop it on its own:
all layers, the OS-level layers without the audit hook, and the audit hook without a namespace
(skipped, with the reason, where this machine cannot run that set)."""

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tether.envs import sandbox
from tether.envs.code_reward import code_tests_reward
from tether.envs.sandbox import SandboxError, run_python, sandbox_layers

pytestmark = pytest.mark.timeout(120)

ALL, NO_AUDIT, NO_NAMESPACE = (), ("audit",), ("bwrap", "unshare")


def usable(without, need=None):
    """`without`, or a skip when this machine cannot run that layer set (or, with need=, when the
    set has no namespace layer among `need`, so nothing but the left-out audit hook could stop it)."""
    try:
        namespace = sandbox.choose_namespace(frozenset(without))
    except SandboxError as err:
        pytest.skip(str(err))
    if need and "audit" in without and namespace not in need:
        pytest.skip(f"no {' or '.join(need)} here: without the audit hook nothing stops this")
    return without


def sandbox_processes():
    """PIDs of sandboxed interpreters (their command line holds the bootstrap's text)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"tether.envs.sandbox" in cmdline and b"-I" in cmdline:
            found.append(int(pid))
    return found


def assert_goes_on(without):
    result = run_python("print(6 * 7)", timeout_s=20, without=without)
    assert result.ok and result.stdout == "42\n"


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
def test_normal_code_runs_writes_in_its_directory_and_the_directory_is_removed(without, monkeypatch):
    usable(without)
    made = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    code = ("import json, math, os\n"
            "with open('out.txt', 'w') as f:\n    f.write('written')\n"
            "print(json.dumps({'pi': round(math.pi, 3)}), open('out.txt').read(), sorted(os.listdir('.')))\n"
            "print(input())\n")
    result = run_python(code, stdin="from stdin\n", timeout_s=20, without=without)
    assert result.ok, result.stderr
    assert result.stdout == '{"pi": 3.142} written [\'main.py\', \'out.txt\']\nfrom stdin\n'
    assert len(made) == 1 and not os.path.exists(made[0])


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
@pytest.mark.parametrize("timeout_s, cpu_s, reason", [(20, 1, "cpu limit"), (1, 20, "wall-clock limit")])
def test_an_infinite_loop_is_stopped(without, timeout_s, cpu_s, reason):
    usable(without)
    result = run_python("while True:\n    pass\n", timeout_s=timeout_s, cpu_s=cpu_s, without=without)
    assert not result.ok and result.killed_reason == reason
    assert result.timed_out == (reason == "wall-clock limit")
    assert_goes_on(without)


@pytest.mark.parametrize("without", [NO_AUDIT, ("audit", "bwrap"), ("audit", "bwrap", "unshare")])
def test_the_process_limit_holds_for_code_that_gets_past_the_audit_hook(without):
    usable(without)
    code = ("import os, time\nforked = 0\nfor _ in range(50):\n"
            "    try:\n        pid = os.fork()\n    except BlockingIOError:\n        continue\n"
            "    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    forked += 1\n"
            "print(forked)\n")
    result = run_python(code, timeout_s=20, max_processes=10, without=without)
    assert result.ok and 0 <= int(result.stdout) <= 9  # 10 processes, this one among them


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
def test_a_fork_bomb_is_stopped_and_leaves_no_process(without):
    usable(without)
    bombs = ["import os\nwhile True:\n    os.fork()\n"]
    # Children that shrug off failed forks and leave the process group: only a PID namespace
    # (bwrap) or the audit hook (which refuses the fork) stops those (docs/environments.md)
    if "audit" not in without or sandbox.choose_namespace(frozenset(without)) == "bwrap":
        bombs.append("import os\nwhile True:\n    try:\n        os.fork() or os.setsid()\n"
                     "    except OSError:\n        pass\n")
    before = set(sandbox_processes())
    # sandbox_processes() does see a running sandbox (so an empty answer below means something)
    sleeper = threading.Thread(target=run_python, args=("import time\ntime.sleep(2)\n",),
                               kwargs={"timeout_s": 10, "without": without})
    sleeper.start()
    deadline = time.monotonic() + 5
    while not set(sandbox_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(sandbox_processes()) - before
    sleeper.join()
    for code in bombs:
        # CPU limit well past the wall clock: a bomb that spins on failed forks is stopped by the
        # wall clock, not by whichever of the two limits a loaded machine reaches first
        result = run_python(code, timeout_s=3, cpu_s=30, max_processes=16, without=without)
        assert not result.ok and result.killed_reason in ("process limit", "refused: os.fork",
                                                          "wall-clock limit")
        deadline = time.monotonic() + 2  # SIGKILL is sent; give the kernel a moment
        while set(sandbox_processes()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(sandbox_processes()) - before
    assert_goes_on(without)


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
def test_a_10_gb_allocation_is_stopped(without):
    usable(without)
    result = run_python("b = bytearray(10 * 1024**3)\nprint('allocated')\n", memory_mb=256,
                        timeout_s=20, without=without)
    assert not result.ok and "allocated" not in result.stdout
    assert result.killed_reason == "memory limit" and "MemoryError" in result.stderr
    assert_goes_on(without)


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
def test_files_outside_the_working_directory_cannot_be_read(without):
    usable(without, need=("bwrap",))
    secret = "s3cret-" + os.urandom(8).hex()
    # world-readable in the shared temp directory: only the sandbox can keep it from the code
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(secret)
    try:
        os.chmod(f.name, 0o644)
        for path in (f.name, "/etc/passwd"):
            result = run_python(f"print(open({path!r}).read())\n", timeout_s=20, without=without)
            assert not result.ok
            assert secret not in result.stdout + result.stderr and "root:" not in result.stdout
    finally:
        os.unlink(f.name)
    assert_goes_on(without)


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
def test_a_socket_to_a_listening_server_is_refused(without):
    usable(without, need=("bwrap", "unshare"))
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = ("import socket\n"
                f"s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                "print('connected')\n")
        result = run_python(code, timeout_s=20, without=without)
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()[0].close()  # a connection that got through would be waiting here
    assert not result.ok and "connected" not in result.stdout
    assert_goes_on(without)


@pytest.mark.parametrize("without", [ALL, NO_AUDIT, NO_NAMESPACE])
def test_a_file_past_the_size_limit_is_not_written(without):
    usable(without)
    code = "import os\nwith open('big', 'wb') as f:\n    f.write(b'x' * (3 << 20))\n"
    result = run_python(code, file_size_mb=1, timeout_s=20, without=without)
    assert not result.ok and result.killed_reason == "file size limit"
    assert_goes_on(without)


def test_output_is_cut_to_the_limit_and_a_flood_ends_at_the_wall_clock():
    usable(ALL)
    result = run_python("import sys\nprint('x' * 100_000)\nprint('y' * 100_000, file=sys.stderr)\n",
                        max_output_chars=100, timeout_s=20)
    assert result.ok and result.stdout == "x" * 100 and result.stderr == "y" * 100
    result = run_python("while True:\n    print('z' * 1000)\n", max_output_chars=50, timeout_s=1)
    assert result.timed_out and result.stdout == "z" * 50


def test_the_audit_hook_keeps_its_decisions_when_the_code_changes_what_it_uses():
    usable(ALL)
    code = ("import os, builtins\n"
            "os.lstat = os.getcwd = None; builtins.any = lambda _: True\n"
            "try:\n    open('/etc/passwd')\nexcept PermissionError as err:\n"
            "    tb = err.__traceback__\n"
            "    while tb.tb_frame.f_code.co_name != 'hook':\n        tb = tb.tb_next\n"
            "    check = tb.tb_frame.f_locals['check_path']\n"
            "    try:\n        check.__defaults__ = (('/',), ('/',)) + check.__defaults__[2:]\n"
            "    except PermissionError:\n        print('defaults kept')\n"
            "print(open('/etc/passwd').read())\n")
    result = run_python(code, timeout_s=20)
    assert "defaults kept" in result.stdout and "root:" not in result.stdout
    assert result.killed_reason == "refused: open"


def test_layers_and_bad_arguments():
    usable(ALL)
    layers = sandbox_layers()
    assert layers[:2] == ["process", "rlimits"] and layers[-1] == "audit"
    assert ("uid" in layers) == (os.geteuid() == 0)
    with pytest.raises(TypeError):
        run_python(b"print(1)")
    for bad in ({"timeout_s": 0}, {"memory_mb": 1}, {"without": {"network"}}, {"without": "audit"}):
        with pytest.raises(ValueError):
            run_python("print(1)", **bad)


def test_code_tests_reward_scores_passing_and_failing_solutions():
    usable(ALL)
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    right = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    chat = [{"role": "assistant", "content": right}]
    # shortcuts that end with status 0 before the tests run are no pass
    exits = [f"```python\nimport os, sys\ndef add(a, b):\n    return 0\n{stop}\n```"
             for stop in ("sys.exit(0)", "os._exit(0)", "print('x' * 20_000)\nexit()")]
    completions = [right, wrong, "def add(a, b): return a + b", right, chat, *exits]
    scores = code_tests_reward(["p"] * len(completions), completions,
                               tests=[tests, tests, tests, None, [tests]] + [tests] * len(exits))
    assert scores == [1.0, 0.0, 0.0, None, 1.0] + [0.0] * len(exits)


def test_the_python_tool_answers_a_call_and_a_stopped_program_lets_the_episode_go_on():
    """tether.envs.python_tool: the policy's code runs in the sandbox; an infinite loop is
    stopped and reported as the tool's result, and the next call works."""
    usable(ALL)
    from tether.envs import python_tool
    from tether.envs.python_tool import PythonTool

    env = PythonTool()
    env.reset({})
    call = '<tool_call>{"name": "python", "arguments": {"code": %s}}</tool_call>'
    obs, reward, done, info = env.step(call % '"print(2 ** 10)"')
    assert obs == [{"role": "tool", "content": "1024"}] and not done and info["tool_errors"] == 0
    old = python_tool.TIMEOUT_S
    python_tool.TIMEOUT_S = 1.0
    try:
        obs, _, done, _ = env.step(call % '"while True: pass"')
    finally:
        python_tool.TIMEOUT_S = old
    assert "[stopped:" in obs[0]["content"] and not done
    obs, _, _, _ = env.step(call % '"open(\'/etc/passwd\').read()"')
    assert "root:" not in obs[0]["content"] and "Error" in obs[0]["content"]
    obs, _, _, _ = env.step(call % '"print(6 * 7)"')
    assert obs[0]["content"] == "42"
    assert env.step("the answer is 42")[2] is True
