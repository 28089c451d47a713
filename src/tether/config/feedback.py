"""The configs of the feedback stages: the labeling page, the judges, and iterated RLHF."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from tether.config.groups import Dtype, LoggingFields, RunConfig
from tether.config.parse import positive
from tether.errors import ConfigError


@dataclass(frozen=True)
class LabelConfig:
    """A local web page on which a person ranks responses: preference pairs and K-wise rankings
    for tether rm / tether dpo, or side-by-side evaluation of two policies. Labels are appended
    to --output as they are given; reopening the page resumes where the rater stopped."""

    input: str = ""
    """Candidates, JSONL: {prompt, responses: [K]}, {prompt, chosen, rejected} (their order is
    ignored, e.g. tether bon's pairs.jsonl), or {prompt, a, b} (two policies side by side; tether
    eval's JSON works too). The prompt may be conversational (a list of role/content messages,
    shown turn by turn and kept in the labels), a response one assistant message. Required."""
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
    output) works too, and its labels give the agreement figure. The prompt may be conversational
    (a list of role/content messages, kept in the labels): a model judge reads it rendered in its
    own chat template, a function in TRL's conversational form. Required."""
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
    dtype: Dtype = "auto"
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
class IterateConfig(LoggingFields, RunConfig):
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
    """Prompts ('prompt' column, or conversational: 'messages', or a 'prompt' of role/content
    messages as in TRL, rendered with the policy's chat template): each round samples its
    comparisons from them, and PPO trains on them. Conversations need --labeler judge or human.
    Required."""
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

    def validate(self) -> None:
        super().validate()
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        positive(self, "rounds", "prompts_per_round", "rm_steps", "rm_batch_size", "max_length",
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
