"""Run model-written Python in a separate, limited process: code-execution rewards, a `python` tool.

    result = run_python("print(sum(range(10)))", timeout_s=2.0)
    result.stdout, result.ok   # ("45\\n", True)

Each call starts a fresh `python -I` (this interpreter, isolated mode) in a new temporary working
directory, removed afterwards, and stops it at a wall-clock limit by killing its whole process
group. Layers, strongest first (`sandbox_layers()` says which are active here):

- bwrap: bubblewrap puts the code in its own network, PID, IPC and UTS namespaces (no network; all
  of its processes die with it) and a filesystem view that holds only /usr, the interpreter's
  directories (read-only), /dev, a fresh /proc and the working directory.
- unshare (util-linux), where bwrap is absent or cannot run: a network namespace only.
- uid: when tether runs as root, the code runs as an unprivileged user (nobody, or the user named
  by $TETHER_SANDBOX_USER).
- rlimits: CPU seconds, address space, file size, processes and threads (RLIMIT_NPROC), no core
  dumps.
- audit: a Python audit hook, installed before the code runs, refuses sockets, new processes,
  ctypes, and files outside the working directory (reading the interpreter's own files aside). It
  is a second line, not a boundary of its own: docs/environments.md, "Sandbox", says what it does
  not stop.

tether.envs.code_reward scores completions by running their code here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional

from tether.errors import TetherError

log = logging.getLogger("tether")

BOOT = Path(__file__).with_name("sandbox_boot.py")
INSIDE = "/sandbox"  # the working directory's path inside bwrap's filesystem view
NAMESPACES = ("bwrap", "unshare")
OPTIONAL = frozenset({*NAMESPACES, "audit"})


class SandboxError(TetherError):
    """The sandbox cannot be set up on this machine; the message says why and what would help."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run printed and how it ended."""

    stdout: str
    """Standard output, cut to max_output_chars."""
    stderr: str
    """Standard error (tracebacks), cut to max_output_chars."""
    returncode: int
    """The exit status; -N when a signal N ended the process."""
    timed_out: bool
    """The wall-clock limit ended it."""
    killed_reason: Optional[str]
    """Why the sandbox stopped it, when it did: "wall-clock limit", "cpu limit", "memory limit",
    "file size limit", "process limit", "refused: <event>" (the audit hook refused something and
    the code did not handle it) or "signal <NAME>"."""

    @property
    def ok(self) -> bool:
        """The code ran to completion and exited with status 0."""
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Limits:
    """One run's limits, checked (run_python's arguments)."""

    timeout_s: float
    cpu_s: int
    memory_mb: int
    max_processes: int
    file_size_mb: int
    max_output_chars: int


def run_python(code: str, *, timeout_s: float = 5.0, cpu_s: Optional[float] = None,
               memory_mb: int = 512, max_processes: int = 64, file_size_mb: int = 16,
               stdin: str = "", max_output_chars: int = 10_000,
               without: Collection[str] = ()) -> SandboxResult:
    """Run `code` as main.py in a fresh sandbox and return what it printed and how it ended.

    timeout_s: wall-clock seconds before the whole run is killed. cpu_s: CPU seconds (RLIMIT_CPU,
    rounded up; default timeout_s). memory_mb: address space (RLIMIT_AS and RLIMIT_DATA).
    max_processes: processes and threads (RLIMIT_NPROC; see the docs for whom it counts).
    file_size_mb: the largest file the code may write (RLIMIT_FSIZE). stdin: its standard input.
    max_output_chars: stdout and stderr are each cut to this many characters. without: layers to
    leave out ("bwrap", "unshare", "audit"), for tests that check one layer alone.

    Nothing the code does makes this raise. It raises ValueError or TypeError for bad arguments,
    and SandboxError when no sandbox can be set up here."""
    limits = checked_limits(code, timeout_s, cpu_s, memory_mb, max_processes, file_size_mb,
                            stdin, max_output_chars, without)
    namespace = choose_namespace(frozenset(without))
    return run(code, stdin, limits, namespace, audit="audit" not in without)


def sandbox_layers() -> list[str]:
    """The layers a default run_python call uses on this machine, e.g. ["process", "rlimits",
    "uid", "bwrap", "audit"] (the module docstring explains each). Raises SandboxError where no
    sandbox can run."""
    namespace = choose_namespace(frozenset())
    return ["process", "rlimits", *(["uid"] if sandbox_ids() else []),
            *([namespace] if namespace else []), "audit"]


def checked_limits(code, timeout_s, cpu_s, memory_mb, max_processes, file_size_mb, stdin,
                   max_output_chars, without) -> Limits:
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise TypeError("run_python: code and stdin must be str")
    unknown = set(without) - OPTIONAL
    if isinstance(without, str) or unknown:
        raise ValueError(f"run_python: without= takes a collection of {sorted(OPTIONAL)}, "
                         f"not {without!r}")
    cpu_s = timeout_s if cpu_s is None else cpu_s
    for name, value, low in (("timeout_s", timeout_s, 0), ("cpu_s", cpu_s, 0), ("memory_mb", memory_mb, 16),
                             ("max_processes", max_processes, 1), ("file_size_mb", file_size_mb, 0),
                             ("max_output_chars", max_output_chars, 0)):
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        # the two time limits must be above 0; the others at least `low`
        if not number or value < low or (name in ("timeout_s", "cpu_s") and value <= 0):
            raise ValueError(f"run_python: {name}={value!r}; give a finite number "
                             + ("above 0" if name in ("timeout_s", "cpu_s") else f"of at least {low}"))
    return Limits(float(timeout_s), math.ceil(cpu_s), int(memory_mb), int(max_processes),
                  int(file_size_mb), int(max_output_chars))


# ---- which layers work here: probed once per process ----

_probed: dict[Optional[str], Optional[str]] = {}  # namespace -> None if it works, else why not
_probe_lock = threading.Lock()
_warned = False


def choose_namespace(without: frozenset) -> Optional[str]:
    """The strongest namespace layer that works here and is not left out, or None for none; raises
    SandboxError when even a run without one fails."""
    global _warned
    with _probe_lock:
        for namespace in (*NAMESPACES, None):
            if namespace in without:
                continue
            if namespace not in _probed:
                _probed[namespace] = probe(namespace)
            if _probed[namespace] is None:
                break
        else:
            tried = [n for n in (*NAMESPACES, None) if n not in without]
            raise SandboxError("the sandbox cannot run Python on this machine"
                               + (f" without {', '.join(sorted(without))}" if without else "") + ": "
                               + "; ".join(f"{n or 'no namespace'}: {_probed[n]}" for n in tried)
                               + unreadable_hint())
        if namespace != "bwrap" and "bwrap" not in without and not _warned:
            _warned = True
            log.warning("sandbox: bubblewrap is not usable here (%s), so model code runs %s, and "
                        "only the audit hook keeps it from files its uid may read, which a program "
                        "written to escape can get past. Install bubblewrap (apt-get install "
                        "bubblewrap) for a minimal read-only filesystem view (docs/environments.md)",
                        _probed["bwrap"], "in a network namespace (unshare)" if namespace else
                        "without namespaces: no network rests on the audit hook too")
        return namespace


def probe(namespace: Optional[str]) -> Optional[str]:
    """None when a sandboxed run with this namespace layer works here, else why it does not."""
    if namespace and not shutil.which(namespace):
        return "not installed"
    try:
        # it must read the interpreter's directories after leaving root (json the bootstrap read before)
        result = run("import os, sys, textwrap\nfor d in sys.path:\n    os.listdir(d)\nprint(1)", "",
                     Limits(timeout_s=30.0, cpu_s=30, memory_mb=512, max_processes=64, file_size_mb=1,
                            max_output_chars=2000), namespace, audit=True)
    except SandboxError as err:
        return str(err)
    if result.ok and result.stdout == "1\n":
        return None
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def unreadable_hint() -> str:
    if not sandbox_ids():
        return ""
    return (f". As root, tether runs model code as uid {sandbox_ids()[0]}; without bubblewrap that "
            f"user must be able to read the interpreter {sys.executable} and its directories. "
            "Install bubblewrap (apt-get install bubblewrap), or run tether with a Python that user "
            "can read")


def sandbox_ids() -> Optional[tuple[int, int]]:
    """(uid, gid) the code runs as when tether runs as root, else None (it keeps tether's own)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("TETHER_SANDBOX_USER", "nobody")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if name.isdigit():
            return int(name), int(name)
        if name != "nobody":
            raise SandboxError(f"TETHER_SANDBOX_USER={name}: no such user") from None
        return 65534, 65534
    if entry.pw_uid == 0:
        raise SandboxError(f"TETHER_SANDBOX_USER={name} is root; name an unprivileged user")
    return entry.pw_uid, entry.pw_gid


# ---- one run ----

@functools.lru_cache(maxsize=1)
def boot_source() -> str:
    return BOOT.read_text(encoding="utf-8")


def run(code: str, stdin: str, limits: Limits, namespace: Optional[str], audit: bool) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="tether-sandbox-")
    try:
        Path(workdir, "main.py").write_bytes(code.encode("utf-8", "surrogatepass"))
        ids = sandbox_ids()
        if ids:
            os.chown(workdir, *ids)
        inside = INSIDE if namespace == "bwrap" else workdir
        config = {"workdir": inside, "uid": ids and ids[0], "gid": ids and ids[1], "audit": audit,
                  "cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb << 20,
                  "file_size_bytes": limits.file_size_mb << 20, "max_processes": limits.max_processes}
        argv = [*namespace_args(namespace, workdir), sys.executable, "-I", "-B", "-u", "-X", "utf8",
                "-c", boot_source(), json.dumps(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": inside, "TMPDIR": inside,
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8", "surrogatepass"))
            stdin_file.seek(0)
            try:
                proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=workdir, env=env,
                                        start_new_session=True)  # its own process group, to kill
            except OSError as err:
                raise SandboxError(f"cannot start the sandbox ({argv[0]}): {err}") from None
        try:
            # UTF-8 takes at most 4 bytes a character
            stdout, stderr, tail, timed_out = collect(proc, limits.timeout_s, 4 * limits.max_output_chars)
        finally:
            kill_group(proc.pid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        remove_tree(workdir)
    returncode = proc.returncode
    if namespace == "bwrap" and 128 < returncode < 128 + signal.NSIG:
        returncode = 128 - returncode  # bwrap reports death by signal N as 128 + N, as a shell does
    cut = limits.max_output_chars
    return SandboxResult(stdout.decode("utf-8", "replace")[:cut], stderr.decode("utf-8", "replace")[:cut],
                         returncode, timed_out, killed_reason(returncode, timed_out, tail))


def collect(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[bytes, bytes, bytes, bool]:
    """Read the child's stdout and stderr until it has exited and the pipes are closed, or until
    the wall-clock limit. Returns (the first `cap` bytes of stdout, of stderr, the last 4 KiB of
    stderr, whether the limit ended it). The rest is read and dropped, so the child never blocks
    on a full pipe and the caller's memory stays bounded."""
    deadline = time.monotonic() + timeout_s
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    tail, open_pipes, exited = b"", 2, False
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable once the child exits (Linux 5.3, Python 3.9)
    except (AttributeError, OSError):
        pidfd = None
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ)
        try:
            while open_pipes or not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), tail, not exited
                for key, _ in selector.select(remaining if pidfd is not None else min(remaining, 0.02)):
                    if key.fileobj is pidfd:
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        open_pipes -= 1
                        continue
                    kept[key.fileobj] += chunk[:max(0, cap - len(kept[key.fileobj]))]
                    if key.fileobj is proc.stderr:
                        tail = (tail + chunk)[-4096:]
                if not exited and has_exited(proc.pid):
                    exited = True
                    if pidfd is not None:
                        selector.unregister(pidfd)
                    kill_group(proc.pid)  # what it started ends with it
                    # a process that left the group may hold the pipes open: stop reading soon
                    deadline = min(deadline, time.monotonic() + 1.0)
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return bytes(kept[proc.stdout]), bytes(kept[proc.stderr]), tail, False


def has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: while it is a zombie its process group
    ID cannot be taken by another process, so killing that group stays safe."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


SIGNAL_REASONS = {signal.SIGXCPU: "cpu limit", signal.SIGXFSZ: "file size limit"}
REFUSAL = re.compile(r"^\w+: sandbox: ([\w.]+)")


def killed_reason(returncode: int, timed_out: bool, tail: bytes) -> Optional[str]:
    if timed_out:
        return "wall-clock limit"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return SIGNAL_REASONS.get(-returncode, f"signal {name}")
    if returncode == 0:
        return None
    text = tail.decode("utf-8", "replace")
    lines = text.strip().splitlines()
    last = lines[-1] if lines else ""
    refusal = REFUSAL.match(last)
    if last.startswith("MemoryError"):
        return "memory limit"
    if "[Errno 27] File too large" in last:  # Python ignores SIGXFSZ: the write fails instead
        return "file size limit"
    if refusal:
        return f"refused: {refusal.group(1)}"
    # RLIMIT_NPROC refused a fork or a thread; many processes may have written at once, so the
    # message is looked for anywhere near the end
    if "[Errno 11] Resource temporarily unavailable" in text or "can't start new thread" in text:
        return "process limit"
    return None


def remove_tree(path: str) -> None:
    """Remove the working directory, also where the code took away its own permissions."""
    try:
        os.chmod(path, 0o700)
        for parent, dirs, _ in os.walk(path):  # top-down: each directory is opened before listing
            for name in dirs:
                if not os.path.islink(os.path.join(parent, name)):
                    os.chmod(os.path.join(parent, name), 0o700)
        shutil.rmtree(path)
    except OSError as err:
        log.warning("sandbox: could not remove its working directory %s: %s", path, err)


# ---- the command that starts the interpreter ----

def namespace_args(namespace: Optional[str], workdir: str) -> list[str]:
    if namespace == "bwrap":
        return bwrap_args(workdir)
    if namespace == "unshare":
        if sandbox_ids():  # root makes the namespace; the bootstrap then leaves root
            return ["unshare", "--net", "--ipc", "--uts"]
        # a user namespace of its own: RLIMIT_NPROC then counts this sandbox's processes only
        return ["unshare", f"--map-user={os.getuid()}", f"--map-group={os.getgid()}",
                "--net", "--ipc", "--uts"]
    return []


def bwrap_args(workdir: str) -> list[str]:
    """bubblewrap: new namespaces, and a filesystem holding /usr, the interpreter's directories
    (read-only), /dev, /proc and the working directory (at /sandbox) only."""
    args = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent"]
    if sandbox_ids():
        # bwrap runs as root, without a user namespace (one made by root would map the code to
        # uid 0, which RLIMIT_NPROC does not limit); the bootstrap leaves root with these two
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]  # RLIMIT_NPROC then counts this sandbox's processes only
    made: set[str] = {"/"}

    def parents(path: str) -> list[str]:
        # bwrap makes missing parent directories 0700, which the sandbox's uid could not enter
        out = []
        for parent in reversed(Path(path).parents):
            if str(parent) not in made:
                made.add(str(parent))
                out += ["--perms", "0755", "--dir", str(parent)]
        return out

    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += parents("/etc/ld.so.cache") + ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    bound = ["/usr"]
    for path in python_dirs():
        if not any(path == b or path.startswith(b + "/") for b in bound):
            bound.append(path)
            args += parents(path) + ["--ro-bind", path, path]
    # no --chdir: bwrap, root without CAP_DAC_OVERRIDE, cannot enter the sandbox uid's 0700
    # directory; the bootstrap changes to it once it is that uid
    return args + ["--proc", "/proc", "--dev", "/dev", "--bind", workdir, INSIDE]


def python_dirs() -> list[str]:
    """The interpreter's prefixes (a virtual environment's and its base's) and its executable's
    directory, both as named and with symbolic links resolved, parents first."""
    named = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable)}
    dirs = {os.path.abspath(p) for p in named} | {os.path.realpath(p) for p in named}
    return sorted((d for d in dirs if d != "/" and os.path.isdir(d)), key=len)
