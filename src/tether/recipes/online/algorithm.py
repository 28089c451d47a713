"""The seam between the online loop and the methods it runs.

An online method is a class with the `Algorithm` hooks below, in a module of its own
(`ppo.py`, `group.py`, `online_dpo.py`). The loop (`loop.py`) and the shared steps (`steps.py`)
call only these hooks, so adding a method means one module, its config (which names the module
in its `algorithm` class variable) and its entry in `tether.stages`:

    responses_per_prompt   how many responses each prompt gets (1 for PPO, G for the groups)
    critic / kl_controller / ptx_source
                           what `setup.build` loads for it
    shape                  the scored batch it trains on (penalties, dynamic sampling, labels)
    experience             that batch's advantages (or preferences): the training batch
    loss                   its loss on a minibatch of the training batch

Everything else (sampling, scoring, reference logprobs, the old policy's logprobs, the update's
minibatches and micro-batches, KL control, metrics, health checks, checkpoints, resume) is the
loop's and is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

from torch import Tensor

from tether.ops.kl import AdaptiveKLController, FixedKLController
from tether.rollout.health import HealthIssue
from tether.rollout.types import Experience

if TYPE_CHECKING:  # the parts import the algorithm's config and the other way round at runtime
    from tether.recipes.online.setup import OnlineParts
    from tether.recipes.online.steps import OldPolicy, PhaseClock, Sampled
    from tether.recipes.online.update import PolicyOutput

KLController = FixedKLController | AdaptiveKLController
CriticKind = Literal["separate", "head", "none"]


@dataclass
class Shaped:
    """A sampled batch as the method trains on it: the rollouts (possibly refilled or filtered)
    and the score each response is paid."""

    sampled: "Sampled"
    scores: Tensor  # (B,) float32
    stats: dict[str, Tensor] = field(default_factory=dict)  # metrics of the shaping
    preference: Optional[Tensor] = None  # (B,) a preference method's labels (Experience.preference)


@dataclass
class Prepared:
    """The training batch and what the method reports about it."""

    experience: Experience
    stats: dict[str, Tensor] = field(default_factory=dict)
    issues: list[Optional[HealthIssue]] = field(default_factory=list)


class Algorithm:
    """The hooks of one online method; the defaults are those most methods share."""

    name = "online"
    #: "tokens": a minibatch's loss is a mean over its response tokens; "rows": over its
    #: responses (or pairs). Decides how micro-batches are weighted.
    mean_over: Literal["tokens", "rows"] = "tokens"
    #: rows that stay together in every minibatch and micro-batch (2: a preference pair)
    unit: int = 1

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def responses_per_prompt(self) -> int:
        return 1

    def critic(self) -> CriticKind:
        return "none"

    def kl_controller(self) -> KLController:
        return FixedKLController(self.cfg.kl_coef)

    def ptx_source(self) -> Optional[str]:
        """PPO-ptx text to keep a language-modelling loss on, if the method has one."""
        return None

    def setup(self, parts: "OnlineParts") -> None:
        """Anything the method loads beyond the shared parts (a judge), once per run."""

    def shape(self, parts: "OnlineParts", step: int, clock: "PhaseClock", sampled: "Sampled") -> Shaped:
        return Shaped(sampled, sampled.scored.scores)

    def experience(self, parts: "OnlineParts", shaped: Shaped, old: "OldPolicy") -> Prepared:
        raise NotImplementedError

    def loss(self, parts: "OnlineParts", mb: Experience,
             out: Optional["PolicyOutput"]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


def load_algorithm(cfg: Any) -> Algorithm:
    """The method a config runs: its class variable `algorithm` names it as module:Class."""
    from tether.specs import load_object

    return load_object(cfg.algorithm, f"{type(cfg).__name__}.algorithm")(cfg)
