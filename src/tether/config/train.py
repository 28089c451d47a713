"""The configs of the stages that train on a fixed data set in the supervised loop
(training/loop.py): SFT, the reward model, DPO and its family, KTO; and `tether score`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from tether.config.groups import (CheckpointFields, Dtype, LoggingFields, LoRAFields, OptimizerFields,
                                  PrecisionFields, RunConfig)
from tether.config.parse import non_negative, positive, required
from tether.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig(CheckpointFields, LoggingFields, LoRAFields, PrecisionFields, OptimizerFields, RunConfig):
    """Fields of every stage that trains a model with an optimizer on a fixed data set."""

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
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per device per micro-batch. Global batch = batch_size x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-batches accumulated before each optimizer step."""
    max_length: int = 512
    """Longest sequence (prompt + response) in tokens."""
    over_length: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than --max-length: cut the response, or skip the example.
    The count is logged either way."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 means at the end of each epoch and of the run."""
    early_stopping_patience: int = 0
    """Stop when the eval loss has not improved for this many evaluations (0 disables)."""

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face model directory or hub id)")
        required(self, "data")
        positive(self, "batch_size", "grad_accum", "max_length", "epochs", "log_every",
                 "save_every", "keep_checkpoints")
        self.check_optimizer()
        self.check_lora(self.fsdp)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max-steps must be positive or -1, got {self.max_steps}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        non_negative(self, "weight_decay")


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations: loss on response tokens only."""

    packing: bool = False
    """Pack several examples into each row of --max-length tokens. A block-diagonal attention
    mask keeps every example from attending to the others, so the loss is the same as unpacked."""


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
        positive(self, "calibration_size")


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
    """Rows to score: {prompt, response} (or {prompt, completion}; the prompt may be a list of
    role/content messages, e.g. tether bon's output from chat prompts, read in the reward model's
    chat template), or any preference format (pairs, hh-rlhf dialogues, K-wise rankings).
    Required."""
    output: str = ""
    """The JSON lines file to write. Required unless --output-dir is given."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_length: int = 1024
    """Longest sequence in tokens; longer ones lose the start of the prompt and the end of the
    response, as in training."""
    dtype: Dtype = "auto"
    """Weight dtype. auto is bfloat16 on a GPU that supports it, float32 otherwise."""

    def validate(self) -> None:
        required(self, "reward_model", "data")
        if not self.output and not self.output_dir:
            raise ConfigError("--output is required (or --output-dir, which writes scores.jsonl)")
        positive(self, "batch_size", "max_length")


@dataclass(frozen=True)
class ReferenceKLFields:
    """The KL to the reference, measured after training (DPO, KTO)."""

    kl_samples: int = 64
    """After training, sample this many held-out prompts from the policy and report
    eval/kl_ref = KL(policy || reference) per sequence (0 disables)."""
    kl_response_length: int = 64
    """Response length for the KL samples."""


@dataclass(frozen=True)
class DPOConfig(ReferenceKLFields, TrainConfig):
    """Direct preference optimisation on preference pairs or K-wise rankings (same formats as
    tether rm), against the frozen starting model as the reference."""

    loss: Literal["sigmoid", "ipo", "robust", "conservative", "hinge", "simpo", "orpo"] = "sigmoid"
    """The preference loss (docs/preference.md gives each formula and its paper): sigmoid (DPO),
    ipo, robust or conservative (DPO under label noise, with --label-smoothing), hinge (SLiC),
    and the reference-free simpo (length-normalised, with a margin) and orpo (the odds-ratio
    term added to the SFT loss). The reference-free ones load no reference, so they report no
    eval/kl_ref (--kl-samples does not apply)."""
    beta: Optional[float] = None
    """The loss's beta. For the reference-based losses, the weight of the implicit reward
    beta * log(pi / pi_ref), i.e. how far the policy may move from the reference (default 0.1,
    DPO's); for simpo, the scale of the length-normalised reward (default 2.0, SimPO's)."""
    label_smoothing: float = 0.0
    """The label-noise rate eps of --loss robust and conservative, in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """--loss simpo: the target reward margin gamma between chosen and rejected."""
    orpo_lambda: float = 0.1
    """--loss orpo: the weight lambda of the odds-ratio term added to the SFT loss."""

    @property
    def loss_beta(self) -> float:
        """--beta, or the loss's own default."""
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss == "simpo" else 0.1

    def validate(self) -> None:
        super().validate()
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.loss == "orpo" and self.beta is not None:
            raise ConfigError("--loss orpo has no beta: its weight is --orpo-lambda")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("robust", "conservative"):
            raise ConfigError(f"--label-smoothing is the label-noise rate of --loss robust and "
                              f"conservative; --loss {self.loss} does not use it")
        non_negative(self, "simpo_gamma", "orpo_lambda")


@dataclass(frozen=True)
class KTOConfig(ReferenceKLFields, TrainConfig):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired labels: each example
    is one response marked desirable or undesirable, as TRL's {prompt, completion, label: bool}
    rows (a pairs, hh-rlhf or K-wise file works too: its best-ranked responses are desirable and
    its worst-ranked undesirable). The reference is the starting model; docs/preference.md
    gives the loss."""

    beta: float = 0.1
    """How far the policy may move from the reference: the scale of the implicit reward
    beta * log(pi / pi_ref) inside the sigmoid (the paper's default 0.1)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of the desirable examples' loss. With unbalanced data the paper
    keeps lambda_D n_D / (lambda_U n_U) between 1 and 4/3."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of the undesirable examples' loss."""

    def validate(self) -> None:
        super().validate()
        positive(self, "beta", "desirable_weight", "undesirable_weight")
