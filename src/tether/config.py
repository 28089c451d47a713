"""Stage configs: one frozen dataclass per stage, filled from YAML then flags, then validated.

Every field has a docstring right under it; `tether <stage> --help` shows those docstrings, so
they are the reference for every option. The order of precedence is: dataclass default < YAML
file (`--config`) < command-line flags. Unknown fields and wrong types are rejected before any
work starts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from tether.errors import ConfigError

# ----------------------------------------------------------------------------- base configs


@dataclass(frozen=True)
class RunConfig:
    """Fields every stage has."""

    output_dir: str = ""
    """Run directory. It becomes the final model (or result) and also holds config.yaml,
    metrics.jsonl, TensorBoard logs and checkpoints/. Required."""
    seed: int = 0
    """Seed for weights, data order and sampling. The same seed gives the same run."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir/checkpoints. Without it, a directory that
    already holds checkpoints is refused so that nothing is overwritten by accident."""
    trust_remote_code: bool = False
    """Allow model code from the model's own repository. Off unless you trust the source."""

    def validate(self) -> None:
        """Check values that types alone cannot catch. Raises ConfigError."""
        if not self.output_dir:
            raise ConfigError("--output-dir is required")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Fields of every stage that trains a model with an optimizer."""

    model: str = ""
    """The model to start from: a Hugging Face model directory, or a hub id where a hub is
    reachable. Required."""
    data: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file (.gz allowed for JSON lines), a directory
    saved with datasets' save_to_disk, or a hub dataset id. Required."""
    eval_data: Optional[str] = None
    """Held-out data in the same format. Without it, eval_fraction of the data is held out."""
    eval_fraction: float = 0.05
    """Fraction of --data held out for evaluation when --eval-data is not given (0 disables)."""
    epochs: int = 1
    """Passes over the training data (ignored when --max-steps is set)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means as many as --epochs take."""
    lr: float = 5e-5
    """Peak learning rate (AdamW). Small models like 1e-4..5e-5, large ones 1e-5."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.05
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    batch_size: int = 8
    """Examples per device per micro-batch. Global batch = batch_size x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-batches accumulated before each optimizer step."""
    max_length: int = 512
    """Longest sequence (prompt + response) in tokens."""
    over_length: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than --max-length: cut the response, or skip the example.
    The count is logged either way."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""
    lora_r: int = 0
    """LoRA rank; 0 means a full fine-tune."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names for LoRA, or all-linear."""
    merge_lora: bool = True
    """Save merged full weights at the end of a LoRA run (plain from_pretrained loads them)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 means at the end of each epoch and of the run."""
    save_every: int = 200
    """Write an atomic checkpoint every N optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    early_stopping_patience: int = 0
    """Stop when the eval loss has not improved for this many evaluations (0 disables)."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events under output_dir/tensorboard."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face model directory or hub id)")
        if not self.data:
            raise ConfigError("--data is required")
        _positive(self, "batch_size", "grad_accum", "max_length", "epochs", "log_every",
                  "save_every", "keep_checkpoints")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be positive or -1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lora_r < 0:
            raise ConfigError(f"--lora-r must be >= 0, got {self.lora_r}")


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations: loss on response tokens only."""

    packing: bool = False
    """Pack several examples into each row of --max-length tokens. A block-diagonal attention
    mask keeps every example from attending to the others, so the loss is the same as unpacked."""


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli or isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag} must be a number; got {value!r}")
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


def from_dict(cls: type, values: dict[str, Any], from_cli_keys: set[str] = frozenset()) -> Any:
    """Build and validate `cls` from a mapping of field name -> value. Raises ConfigError."""
    hints = _type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for raw_key, value in values.items():
        key = normalise_key(raw_key)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            if _FAMILIAR.get(key) in known:
                close = [_FAMILIAR[key]]
            hint = f" Did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key.replace('_', '-')} for {cls.__name__}.{hint}"
                              " See --help for the full list.")
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
        if key.startswith("no_") and hints.get(key[3:]) is bool and not eq:
            out[key[3:]] = "false"
            i += 1
            continue
        if hints.get(key) is bool and not eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")
                                                   or argv[i + 1].lower() not in _TRUE | _FALSE):
            out[key] = "true"
            i += 1
            continue
        if eq:
            out[key] = inline
            i += 1
        else:
            out[key] = _next_value(argv, i, "--" + key.replace("_", "-"))
            i += 2
    return config_path, out


def _next_value(argv: list[str], i: int, flag: str) -> str:
    if i + 1 >= len(argv):
        raise ConfigError(f"{flag} needs a value")
    return argv[i + 1]


def load_config(cls: type, argv: list[str]) -> Any:
    """YAML (if --config is given) then flags, validated: the resolved config for one stage."""
    config_path, flags = parse_flags(cls, argv)
    values = {normalise_key(k): v for k, v in read_yaml(config_path).items()} if config_path else {}
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
