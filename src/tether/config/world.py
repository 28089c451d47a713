"""The configs of the built-in world's stages: the demo, pretraining, and the data export."""

from __future__ import annotations

from dataclasses import dataclass

from tether.config.groups import RunConfig
from tether.errors import ConfigError


@dataclass(frozen=True)
class WorldExportConfig(RunConfig):
    """Write the built-in world's data sets as JSONL: corpus, SFT rows, preference pairs, K-wise
    rankings and prompts (train and held-out), in exactly the formats the stages read."""

    n_sft: int = 2000
    """SFT demonstrations (train split)."""
    n_pairs: int = 4000
    """Labelled preference pairs (train split)."""
    n_rankings: int = 1000
    """K-wise ranked groups (train split)."""
    k: int = 4
    """Responses per ranked group."""
    n_prompts: int = 2000
    """Training prompts for PPO and best-of-N."""
    n_prompts_eval: int = 200
    """Held-out prompts (never in any training file)."""
    n_corpus: int = 20000
    """Pretraining documents."""


@dataclass(frozen=True)
class PretrainConfig(RunConfig):
    """Pretrain the built-in world's tiny Llama from scratch on the world corpus (no downloads).
    The output directory is a standard Hugging Face model with the world tokenizer."""

    corpus_docs: int = 20000
    """Documents of world text to train on (2% are held out for perplexity)."""
    steps: int = 500
    """Optimizer steps. About 2 minutes on 2 CPU cores at the defaults."""
    batch_size: int = 32
    """Documents per step."""
    lr: float = 3e-3
    """Peak learning rate; a 1M-parameter model trained from scratch takes a large one."""
    max_length: int = 128
    """Longest document in tokens (world documents are shorter)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        super().validate()
        if self.steps <= 0 or self.corpus_docs < 10:
            raise ConfigError("--steps must be > 0 and --corpus-docs >= 10")


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    """Run the whole RLHF pipeline in the built-in synthetic world (CPU, no network, under
    10 minutes on 2 cores): pretrain, SFT, ranked SFT samples, RM, PPO (default beta and beta = 0),
    DPO, online DPO, best-of-N, a verifiable quiz trained with GRPO and RLOO against an exact-match reward
    function, gold-judged evaluation and the report."""

    output_dir: str = "tether-demo"
    """Where every stage's output, summary.json and report.html go."""
    quick: bool = False
    """A much smaller run (about a minute) for tests and smoke checks; its numbers mean little."""
    kl_coef: float = 0.1
    """The default-beta PPO run's KL coefficient."""
    temperature: float = 0.7
    """The sampling temperature of every stage that samples: the RM's rankings and test pairs,
    both PPO runs, best-of-N and the evaluation (whose KL is read at the same temperature).
    0.7 is tether's PPO default, as in lm-human-preferences."""
    beta0_lr: float = 3e-4
    """The beta = 0 run's policy learning rate. It is 3x the default run's (1e-4), so that the
    proxy is chased hard enough, within its 25 iterations, to show over-optimisation."""
    rounds: int = 1
    """Rounds of iterated RLHF. With 2 (or more), after the pipeline above (round 1) each further
    round samples the last policy, has the world's rater rank the samples, retrains the RM on
    every label so far, runs PPO from the last policy (tether iterate), and repeats the beta = 0
    stress test against the new RM. Adds a few minutes per round."""
