"""The first code the sandboxed interpreter runs, before the model's code (tether.envs.sandbox).

tether never imports this module: it passes its text to `python -I -c`, with the configuration as
argv[1] (JSON). It lowers the resource limits, leaves root for the sandbox's uid, installs the
audit hook and runs main.py from the working directory as __main__.

The audit hook is a second line behind the operating system's limits, not a security boundary on
its own: see docs/environments.md, "Sandbox", for what it does not stop. It binds everything it
uses (functions, builtins, constants) when it is made, so that code which replaces os.lstat or
builtins.any does not change its decisions.
"""

import json
import os
import resource
import sys

# Events refused outright: new processes, network, native code, and the introspection that could
# reach the hook's functions (gc) or run code inside the hook (trace and profile functions).
REFUSED = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "os.killpg", "subprocess.Popen", "os.link", "os.symlink", "cpython.PyInterpreterState_New",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
    "sys._current_frames", "sys._current_exceptions", "sys.monitoring.register_callback",
    "sqlite3.enable_load_extension", "sqlite3.load_extension",
})
REFUSED_PREFIXES = ("socket.", "ctypes.")
REFUSED_IMPORTS = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend"})
# event -> (indexes of the paths it names, indexes of its dir_fd arguments, whether it writes)
PATH_EVENTS = {
    "os.listdir": ((0,), (), False), "os.scandir": ((0,), (), False),
    "os.getxattr": ((0,), (), False), "os.listxattr": ((0,), (), False),
    "os.mkdir": ((0,), (2,), True), "os.remove": ((0,), (1,), True), "os.rmdir": ((0,), (1,), True),
    "os.rename": ((0, 1), (2, 3), True), "os.chmod": ((0,), (2,), True),
    "os.chown": ((0,), (3,), True), "os.utime": ((0,), (3,), True), "os.truncate": ((0,), (), True),
    "os.setxattr": ((0,), (), True), "os.removexattr": ((0,), (), True),
    "sqlite3.connect": ((0,), (), True),
}
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def set_limits(cfg):
    """Soft and hard limits both (the hard one cannot be raised again without privilege); the CPU
    limit's hard value is a second later, so SIGXCPU arrives first and names the cause."""
    limits = [(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),
              (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
              (resource.RLIMIT_DATA, cfg["memory_bytes"], cfg["memory_bytes"]),
              (resource.RLIMIT_FSIZE, cfg["file_size_bytes"], cfg["file_size_bytes"]),
              (resource.RLIMIT_NPROC, cfg["max_processes"], cfg["max_processes"]),
              (resource.RLIMIT_CORE, 0, 0)]
    for which, soft, hard in limits:
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


def leave_root(uid, gid):
    """Become uid/gid for good (real, effective and saved ids), with no supplementary groups."""
    if 0 not in os.getresuid():
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if 0 in os.getresuid() or 0 in os.getresgid():
        sys.exit("sandbox: could not leave root")


def python_dirs():
    """The interpreter's own import directories (standard library, site-packages): the entries of
    sys.path that lie inside one of its prefixes. Others (an editable install's source tree, a
    .pth file's directory) are dropped from sys.path too."""
    prefixes = {os.path.realpath(p) for p in
                (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    dirs = []
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else ""
        if real and os.path.isdir(real) and any(real == p or real.startswith(p.rstrip("/") + "/")
                                                for p in prefixes):
            dirs.append(real)
    return dirs


def make_hook(workdir, python_read):
    """The audit hook: paths outside `workdir` (and, for reading, `python_read` and a few devices)
    are refused, as are the events above. Refusals raise PermissionError (ImportError for an
    import), whose message starts with "sandbox:".

    The hook and its helpers have no closure and read no global at call time: all they use is
    bound as positional defaults (a tuple, which cannot be changed in place). A traceback through
    the hook shows these values, and changing a function's defaults or code is an audited event
    that the hook refuses for the functions of this file."""
    type_, str_ = type, str
    encoding = sys.getfilesystemencoding()

    def refuse(event, detail="", PermissionError_=PermissionError):
        raise PermissionError_(f"sandbox: {event} is not allowed{detail}")

    def as_text(path, type_=type_, str_=str_, bytes_=bytes, issubclass_=issubclass,
                slice_=slice, encoding=encoding):
        """`path` as an exact str (a str or bytes subclass could run code in its methods), or
        None for any other type."""
        if type_(path) is str_:
            return path
        if issubclass_(type_(path), str_):
            return str_.__str__(path)
        if issubclass_(type_(path), bytes_):
            return bytes_.decode(bytes_.__getitem__(path, slice_(None)), encoding, "surrogateescape")
        return None

    def resolve(path, lstat=os.lstat, readlink=os.readlink, getcwd=os.getcwd, refuse=refuse,
                reversed_=reversed, OSError_=OSError):
        """The absolute path with '.', '..' and symbolic links resolved, like os.path.realpath."""
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo = [p for p in reversed_(path.split("/")) if p and p != "."]
        done, hops = [], 0
        while todo:
            name = todo.pop()
            if name == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join(done + [name])
            try:
                mode = lstat(here).st_mode
            except OSError_:
                done.append(name)
                continue
            if mode & 0o170000 != 0o120000:
                done.append(name)
                continue
            hops += 1
            if hops > 40:
                refuse("open", " (too many symbolic links)")
            target = readlink(here)
            if target.startswith("/"):
                done = []
            todo.extend(p for p in reversed_(target.split("/")) if p and p != ".")
        return "/" + "/".join(done)

    def check_path(event, path, write, read_roots=(workdir, *python_read), write_roots=(workdir,),
                   devices=DEVICES, as_text=as_text, resolve=resolve, refuse=refuse, type_=type_,
                   int_=int, any_=any):
        if type_(path) is int_ or path is None:  # an open file descriptor, or the cwd
            return
        text = as_text(path)
        if text is None:
            refuse(event, f" for a path of type {type_(path).__name__}")
        real = resolve(text)
        roots = write_roots if write else read_roots
        if real in devices or any_(real == r or real.startswith(r + "/") for r in roots):
            return
        refuse(event, f" for {text!r}: outside the working directory")

    def hook(event, args, refused=REFUSED, prefixes=REFUSED_PREFIXES, imports=REFUSED_IMPORTS,
             path_events=tuple(PATH_EVENTS.items()), path_event_names=frozenset(PATH_EVENTS),
             write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
             workdir=workdir, check_path=check_path, resolve=resolve, as_text=as_text,
             refuse=refuse, getpid=os.getpid, function=type(make_hook), type_=type_, str_=str_,
             int_=int, len_=len, any_=any, ImportError_=ImportError, own_code=()):
        if event in refused or event.startswith(prefixes):
            refuse(event)
        if event == "import":
            if args[0].partition(".")[0] in imports:
                raise ImportError_(f"sandbox: import {args[0]} is not allowed")
        elif event == "open":
            mode = args[1] if len_(args) > 1 else None
            flags = args[2] if len_(args) > 2 and type_(args[2]) is int_ else 0
            write = flags & write_flags != 0 or (type_(mode) is str_ and any_(c in mode for c in "wax+"))
            check_path(event, args[0], write)
        elif event in path_event_names:
            for name, (paths, dir_fds, write) in path_events:
                if name == event:
                    for i in dir_fds:
                        if i < len_(args) and type_(args[i]) is int_ and args[i] != -1:
                            refuse(event, " with dir_fd")
                    for i in paths:
                        check_path(event, args[i], write)
        elif event == "os.chdir":
            # A fixed cwd keeps relative paths (which the hook resolves from it) meaning one thing
            if type_(args[0]) is int_ or resolve(as_text(args[0]) or "") != workdir:
                refuse(event, ": the working directory is fixed")
        elif event == "os.kill":
            if args[0] != getpid():
                refuse(event, " for another process")
        elif event == "object.__setattr__":
            if (type_(args[0]) is function and args[1] in ("__code__", "__defaults__", "__kwdefaults__")
                    and any_(args[0].__code__ is c for c in own_code)):
                refuse(event, f" for {args[1]} of the sandbox's own functions")

    functions = (refuse, as_text, resolve, check_path, hook)
    hook.__defaults__ = hook.__defaults__[:-1] + (tuple(f.__code__ for f in functions),)
    return hook


def main():
    cfg = json.loads(sys.argv[1])
    set_limits(cfg)
    if cfg["uid"] is not None:
        leave_root(cfg["uid"], cfg["gid"])
    workdir = cfg["workdir"]
    os.chdir(workdir)
    dirs = python_dirs()
    sys.path[:] = dirs
    if cfg["audit"]:
        sys.addaudithook(make_hook(os.path.realpath(workdir), tuple(dirs)))
    # main.py runs in a module of its own: `import __main__` does not reach this file's names
    module = type(sys)("__main__")
    module.__file__ = os.path.join(workdir, "main.py")
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    with open("main.py", encoding="utf-8", errors="surrogatepass") as f:
        return f.read(), module.__dict__


if __name__ == "__main__":
    source, namespace = main()
    del main, make_hook  # nothing here may reach the installed hook
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as err:  # the traceback without this file's frame
        err = err.with_traceback(err.__traceback__.tb_next)
        sys.excepthook(type(err), err, err.__traceback__)
        sys.exit(1)
