"""The one parser of every stage's config: YAML, then flags, then validation, and --help.

Configs are frozen dataclasses (the other modules of this package) with a docstring right under
every field; `tether <stage> --help` shows those docstrings, so they are the reference for every
option. The order of precedence is: dataclass default < YAML file (`--config`) < command-line
flags. Unknown fields and wrong types are rejected before any work starts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from tether.errors import ConfigError

# ----------------------------------------------------------------------------- docstrings


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it (MRO-aware)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# ----------------------------------------------------------------------------- type coercion


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _describe(inner[0]) + "|none"
    if origin is list:
        return "list[" + _describe(typing.get_args(tp)[0]) + "]"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(name: str, value: Any, tp: Any, from_cli: bool) -> Any:
    """Turn `value` into type `tp` or raise ConfigError naming the field.

    Values from the command line are strings and get parsed; values from YAML are already typed
    and must match (an int is accepted for a float, nothing else is converted).
    """
    origin = typing.get_origin(tp)
    flag = "--" + name.replace("_", "-")
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and str(value).lower() in {"none", "null"}):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(name, value, inner[0], from_cli)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{flag} must be a list; got {value!r}")
        return [coerce(name, v, item, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ConfigError(f"{flag} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{flag} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag} must be an integer; got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_cli or isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{flag} must be a number; got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{flag} must be a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{flag} must be a string; got {value!r}")
    return value


# ----------------------------------------------------------------------------- building


# Names users bring from other tools; suggested (never silently accepted) when they appear.
_FAMILIAR = {"learning_rate": "lr", "num_train_epochs": "epochs", "model_name_or_path": "model",
             "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
             "train_file": "data", "validation_file": "eval_data", "output": "output_dir",
             "max_seq_length": "max_length", "beta": "kl_coef"}


def normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def unknown_option(cls: type, key: str) -> ConfigError:
    """The error for an option `cls` does not have, with the closest names as suggestions."""
    known = {f.name for f in fields(cls)}
    close = difflib.get_close_matches(key, sorted(known), n=3)
    if _FAMILIAR.get(key) in known:
        close = [_FAMILIAR[key]]
    hint = f" Did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?" if close else ""
    return ConfigError(f"unknown option --{key.replace('_', '-')} for {cls.__name__}.{hint}"
                       " See --help for the full list.")


def from_dict(cls: type, values: dict[str, Any], from_cli_keys: set[str] = frozenset()) -> Any:
    """Build and validate `cls` from a mapping of field name -> value. Raises ConfigError."""
    hints = _type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for raw_key, value in values.items():
        key = normalise_key(raw_key)
        if key not in known:
            raise unknown_option(cls, key)
        kwargs[key] = coerce(key, value, hints[key], from_cli=key in from_cli_keys)
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def parse_flags(cls: type, argv: list[str]) -> tuple[Optional[str], dict[str, Any]]:
    """Split argv into (--config path, {field: raw string value}).

    Accepts `--name value`, `--name=value`, `--flag` (true) and `--no-flag` (false) for booleans.
    Dashes and underscores are interchangeable.
    """
    hints = _type_hints(cls)
    config_path, out = None, {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options look like --name value")
        key, eq, inline = token[2:].partition("=")
        key = normalise_key(key)
        if key == "config":
            value, i = (inline, i + 1) if eq else (_next_value(argv, i, "--config"), i + 2)
            config_path = value
            continue
        if key.startswith("no_") and _is_bool(hints.get(key[3:])) and not eq:
            out[key[3:]] = "false"
            i += 1
            continue
        if key not in hints:  # say so now, before the next token is taken as its value
            raise unknown_option(cls, key)
        if _is_bool(hints.get(key)) and not eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")
                                                   or argv[i + 1].lower() not in _TRUE | _FALSE):
            out[key] = "true"
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        else:
            value, i = _next_value(argv, i, "--" + key.replace("_", "-")), i + 2
        if _is_list(hints.get(key)) and key in out:
            out[key] = f"{out[key]},{value}"  # a list option given several times: all of them
        else:
            out[key] = value
    return config_path, out


def _is_bool(tp: Any) -> bool:
    """bool, or Optional[bool]: a switch (--name / --no-name)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)] == [bool]
    return tp is bool


def _is_list(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is list for a in typing.get_args(tp))
    return typing.get_origin(tp) is list


def _next_value(argv: list[str], i: int, flag: str) -> str:
    if i + 1 >= len(argv):
        raise ConfigError(f"{flag} needs a value")
    return argv[i + 1]


def load_config(cls: type, argv: list[str]) -> Any:
    """YAML (if --config is given) then flags, validated: the resolved config for one stage."""
    config_path, flags = parse_flags(cls, argv)
    values = {normalise_key(k): v for k, v in read_yaml(config_path).items()} if config_path else {}
    # a run directory's own config.yaml names the config it was written from (save_config), so
    # it can be fed back with --config, to the same stage only
    stage = values.pop("stage", None)
    if stage is not None and stage != cls.__name__:
        raise ConfigError(f"{config_path} was written for {stage}, not {cls.__name__}: pass it to "
                          "the stage that wrote it (see its run directory's config.yaml)")
    unknown = [k for k in values if k not in {f.name for f in fields(cls)}]
    if unknown:
        err = unknown_option(cls, unknown[0])
        raise ConfigError(f"{config_path}: {err}") from None
    values.update(flags)
    return from_dict(cls, values, from_cli_keys=set(flags))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config (what actually ran) into the run directory, atomically."""
    import yaml

    from tether.training.files import atomic_write_text

    path = Path(output_dir) / name
    body = yaml.safe_dump({"stage": type(cfg).__name__, **to_dict(cfg)}, sort_keys=False)
    atomic_write_text(path, body)
    return path


def config_help(cls: type, prog: str) -> str:
    """The --help text: the class docstring, then every field with its type, default and doc."""
    hints = _type_hints(cls)
    docs = field_docs(cls)
    lines = [f"usage: {prog} [--config FILE.yaml] [--option value ...]", ""]
    lines += [textwrap.fill(inspect.getdoc(cls) or "", 96), ""]
    lines += ["options (YAML keys use the same names with underscores; flags override YAML):",
              "  --config FILE.yaml", "      Read options from a YAML file first.", ""]
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "(required)" if default == "" and "Required" in docs.get(f.name, "") else f"(default: {default})"
        lines.append(f"  --{f.name.replace('_', '-')} {_describe(hints[f.name])}  {shown}")
        for doc_line in textwrap.wrap(docs.get(f.name, ""), 90):
            lines.append("      " + doc_line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got "
                              f"{getattr(cfg, name)}")


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def required(cfg: Any, *names: str) -> None:
    """Each option must be given (a non-empty value)."""
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
