"""Load a function or class named by a `module:name` spec.

tether names user code and its own stages the same way: `package.module:name` (a module that
Python can import) or `path/to/file.py:name` (a file anywhere, imported on its own). The stage
registry (`tether.stages`), --reward-fn and --gold-judge all load through `load_object`, so
every spec is read by one rule and a bad one gets the same clear error wherever it was given.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tether.errors import ConfigError

FORMS = "path/to/file.py:function_name or package.module:function_name"


def load_object(spec: str, what: str) -> Any:
    """The function (or class) that `spec` names, `path/to/file.py:name` or `package.module:name`.

    `what` says what the spec was given for (an option such as "--reward-fn"); every error is a
    ConfigError that starts with it and the spec. The last colon splits the spec, so a Windows
    path (C:\\...\\f.py:name) works.
    """
    # 1. split the spec into where to look and the name to look up
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"{what} {spec!r}: give it as {FORMS}")
    # 2. import the module: a file by its path, anything else by its module name
    if _is_file_path(target):
        module = _import_file(target, spec, what)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ConfigError(f"{what} {spec!r}: cannot import {target} ({err})") from err
    # 3. the name must be there, and be something to call
    found = getattr(module, name, None)
    if not callable(found):
        raise ConfigError(f"{what} {spec!r}: {target} has no function {name!r}")
    return found


def _is_file_path(target: str) -> bool:
    """A target that ends in .py or holds a path separator is a file; a module name has neither."""
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(target: str, spec: str, what: str) -> ModuleType:
    """Import a Python file under a name of its own (the same file gets the same module name,
    so loading it twice gives functions of one module)."""
    path = Path(target).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {spec!r}: {path} is not a file")
    module_name = f"tether_user_code_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise ConfigError(f"{what} {spec!r}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as err:  # user code: any error it raises on import is the spec's fault
        raise ConfigError(f"{what} {spec!r}: importing {path} raised {type(err).__name__}: {err}") from None
    return module
