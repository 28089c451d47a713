"""Field groups that several stages share, each written once: the run, the optimizer, LoRA,
precision and sharding, sampling, logging and checkpoints. A stage's config inherits the groups
it needs and re-declares a field only where its default differs (the docstring under the new
default says why)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, Optional

from tether.config.parse import non_negative, positive
from tether.errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LRSchedule = Literal["cosine", "linear", "constant"]


@dataclass(frozen=True)
class RunConfig:
    """Fields every stage that writes a run directory has."""

    output_dir: str = ""
    """Run directory. It becomes the final model (or result) and also holds config.yaml,
    metrics.jsonl, the trackers' logs (--report-to), trackers.json and checkpoints/. Required."""
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
class OptimizerFields:
    """AdamW, its learning-rate schedule, clipping, and the backward pass's memory."""

    lr: float = 5e-5
    """Peak learning rate (AdamW). Small models like 1e-4..5e-5, large ones 1e-5."""
    lr_scheduler: LRSchedule = "cosine"
    """How the learning rate moves over the run's optimizer steps after the warmup: held
    (constant), decayed linearly to 0, or along a cosine to 0."""
    warmup_ratio: float = 0.05
    """Fraction of the optimizer steps spent warming the learning rate up from 0."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm (each trained model's on its own) to this value (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""

    def check_optimizer(self) -> None:
        for name in ("lr", "adam_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        non_negative(self, "max_grad_norm")


@dataclass(frozen=True)
class PrecisionFields:
    """The weights' dtype, and whether they are sharded over the processes."""

    dtype: Dtype = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""
    fsdp: bool = False
    """Shard the models over the processes of the launch with torch FSDP2 (fully_shard per
    decoder layer and the root) instead of replicating them: a trained model with its gradients
    and optimizer state, a frozen one (reference, reward model) without. Launch with
    `accelerate launch --multi_gpu --num_processes N` (N >= 2, CPUs included). Checkpoints hold
    each process's shards; resume with the same N. A final model is one plain Hugging Face
    directory. Not with --lora-r. docs/distributed.md says what each stage shards."""


@dataclass(frozen=True)
class LoRAFields:
    """Low-rank adapters instead of a full fine-tune."""

    lora_r: int = 0
    """LoRA rank; 0 means a full fine-tune."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names for LoRA, or all-linear."""
    merge_lora: bool = True
    """Save merged full weights at the end of a LoRA run (plain from_pretrained loads them)."""

    def check_lora(self, fsdp: bool) -> None:
        non_negative(self, "lora_r")
        if fsdp and self.lora_r > 0:
            raise ConfigError("--fsdp cannot be combined with --lora-r: LoRA's adapters are small, "
                              "so train them replicated (drop --fsdp; accelerate launch --multi_gpu "
                              "gives DDP), or train all weights sharded (--lora-r 0)")


@dataclass(frozen=True)
class SamplingFields:
    """How responses are sampled from a policy."""

    response_length: int = 64
    """Most tokens per response; a response stops earlier at its first EOS."""
    temperature: float = 1.0
    """Sampling temperature (1.0 samples the policy as it is). A KL to a reference is measured
    between the two models at this same temperature, since that is what the samples come from."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off). Off by default: a KL, and PPO's ratio,
    assume that responses are drawn from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off), off by default for the same reason as --top-k."""

    def check_sampling(self) -> None:
        positive(self, "response_length", "temperature")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"--top-p must be in (0, 1] and --top-k >= 0; got {self.top_p}, {self.top_k}")


# --report-to's trackers: the modules each one needs, and the command that installs them
TRACKERS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "trackio": ("trackio",),
            "mlflow": ("mlflow",)}
TRACKER_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'tether[trackers]'",
                   "mlflow": "pip install 'tether[trackers]'", "trackio": "pip install 'tether[trackers]'"}


def tracker_names(report_to: str) -> tuple[str, ...]:
    """The trackers a --report-to value names, in its order, each once; () for none. Raises
    ConfigError for a name it does not know, listing the valid ones."""
    names = [n.strip().lower() for n in str(report_to).split(",") if n.strip()]
    if names == ["none"]:
        return ()
    valid = ", ".join(TRACKERS)
    if not names:
        raise ConfigError(f"--report-to is empty; give a comma-separated list of {valid}, or none")
    for name in names:
        if name == "none":
            raise ConfigError(f"--report-to {report_to}: none cannot be combined with a tracker")
        if name not in TRACKERS:
            raise ConfigError(f"--report-to: unknown tracker {name!r}; the valid ones are {valid} "
                              "(comma-separated), or none")
    return tuple(dict.fromkeys(names))


def check_trackers_installed(names: tuple[str, ...]) -> None:
    """Refuse, before any work starts, a tracker whose library is not installed: the error
    names the command that installs it."""
    for name in names:
        modules = TRACKERS[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            modules += ("sqlalchemy", "alembic")  # the local sqlite store under output_dir/mlruns
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--report-to {name} needs the {', '.join(missing)} package"
                              f"{'s' if len(missing) > 1 else ''}, which is not installed: "
                              f"{TRACKER_INSTALL[name]}")


@dataclass(frozen=True)
class LoggingFields:
    """Metrics and progress."""

    report_to: str = "tensorboard"
    """Where the metrics of output_dir/metrics.jsonl also go, under the same names and steps: a
    comma-separated list of tensorboard, wandb, trackio and mlflow, or none. Each writes locally
    under output_dir unless told otherwise: tensorboard/; W&B offline in wandb/ (unless WANDB_MODE
    is set); MLflow's sqlite store in mlruns/ (unless MLFLOW_TRACKING_URI is set); trackio in
    trackio/ (unless TRACKIO_DIR is set). output_dir/trackers.json says where each run went. The
    run's config is logged as its parameters; only the main process logs. wandb, mlflow and
    trackio need pip install 'tether[trackers]' (docs/metrics.md, Trackers)."""
    tensorboard: Optional[bool] = None
    """The older switch for TensorBoard, still read: --no-tensorboard takes tensorboard out of
    --report-to, --tensorboard adds it. It is folded into --report-to when the config is built
    (a saved config.yaml holds the result there, and null here)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        names = list(tracker_names(self.report_to))
        if self.tensorboard is True and "tensorboard" not in names:
            names.insert(0, "tensorboard")
        elif self.tensorboard is False and "tensorboard" in names:
            names.remove("tensorboard")
        check_trackers_installed(tuple(names))
        # frozen: the one spelling of the choice from here on
        object.__setattr__(self, "report_to", ",".join(names) or "none")
        object.__setattr__(self, "tensorboard", None)


@dataclass(frozen=True)
class CheckpointFields:
    """Atomic checkpoints, for resume."""

    save_every: int = 200
    """Write an atomic checkpoint every N optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
