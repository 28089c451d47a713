"""Online DPO (`tether online-dpo`; Guo et al. 2024, "Direct Language Model Alignment from Online
AI Feedback"): each iteration samples two responses per prompt from the current policy, a
labeler says which is better, and the policy takes a DPO-family step on those pairs against the
frozen reference.

The labelers are those of `tether judge`, reused: a reward model or Python reward functions
(the run's reward sources, the higher score wins), or an LM judge (`--judge`, asked in both
orders; feedback/judge.py). A pair the labeler cannot split (equal scores, a tie, a judge input
that is too long) gets no label and adds nothing to the loss. The loss is any of the pair
losses of `losses/dpo.py` (docs/preference.md) on sequence log-probabilities at the sampling
temperature, as the rest of the online loop computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from tether.losses.dpo import pair_losses
from tether.ops.kl import FixedKLController
from tether.recipes.online.algorithm import Algorithm, KLController, Prepared, Shaped
from tether.rollout.health import check_kl_not_negative
from tether.rollout.types import Experience

if TYPE_CHECKING:
    from tether.config import OnlineDPOConfig
    from tether.recipes.online.setup import OnlineParts
    from tether.recipes.online.steps import OldPolicy, PhaseClock, Sampled
    from tether.recipes.online.update import PolicyOutput


class OnlineDPO(Algorithm):
    name = "online-dpo"
    cfg: "OnlineDPOConfig"
    mean_over = "rows"  # a mean over pairs
    unit = 2  # a pair's two rows stay together in every minibatch

    def __init__(self, cfg: "OnlineDPOConfig"):
        super().__init__(cfg)
        self.judge: Optional[Any] = None

    def responses_per_prompt(self) -> int:
        return 2

    def kl_controller(self) -> KLController:
        """No KL term in the reward or the loss: DPO's beta is its implicit KL weight. The KL
        to the reference is still measured and logged (objective/kl)."""
        return FixedKLController(0.0)

    def setup(self, parts: "OnlineParts") -> None:
        if not self.cfg.judge:
            return
        from tether.feedback.judge import model_rater
        from tether.recipes.judge import load_lm_judge
        from tether.training.launch import resolve_dtype

        cfg = self.cfg
        answers = tuple(a.strip() for a in cfg.judge_answer_tokens.split(","))
        self.judge = load_lm_judge(cfg.judge, cfg.judge_template, answers, resolve_dtype(cfg.dtype),
                                   cfg.trust_remote_code, parts.device, model_rater("judge", cfg.judge),
                                   cfg.judge_batch_size)
        self.judge.model.requires_grad_(False)

    def shape(self, parts: "OnlineParts", step: int, clock: "PhaseClock", sampled: "Sampled") -> Shaped:
        """Each pair's label: +1 on the better response's row, -1 on the other's, 0 on both
        when the labeler cannot split them (or, with --mask-truncated, when either response was
        cut at --response-length)."""
        scores = sampled.scored.scores
        if self.judge is not None:
            scores = self._judge(sampled).to(scores)
        a, b = scores[0::2], scores[1::2]
        sign = torch.sign(a - b)
        if self.cfg.mask_truncated:
            ended = sampled.rollout.ended
            sign = sign * (ended[0::2] & ended[1::2]).to(sign)
        preference = torch.stack([sign, -sign], dim=1).flatten()
        clock.lap("label")
        return Shaped(sampled, scores, {"dpo/labelled_frac": (sign != 0).float().mean()}, preference)

    def _judge(self, sampled: "Sampled") -> Tensor:
        """The LM judge's p(better) for each response of each pair (0.5 each where it gave no
        verdict or a tie)."""
        from tether.feedback.items import Item
        from tether.feedback.judge import Verdict

        texts, prompts = sampled.scored.texts, sampled.texts
        items = [Item(f"pair {k}", prompts[2 * k], (texts[2 * k], texts[2 * k + 1]), (), None,
                      f"iteration pair {k + 1}") for k in range(len(texts) // 2)]
        scores = []
        for outcome in self.judge(items):
            if isinstance(outcome, Verdict):
                scores += [outcome.wins[0], outcome.wins[1]]
            else:
                scores += [0.5, 0.5]
        return torch.tensor(scores, dtype=torch.float32)

    def experience(self, parts: "OnlineParts", shaped: Shaped, old: "OldPolicy") -> Prepared:
        sampled, mask = shaped.sampled, shaped.sampled.rollout.response_mask
        kl = (old.logprobs - sampled.ref_logprobs) * mask
        exp = Experience(sampled.seqs, old.logprobs, sampled.ref_logprobs, rm_scores=sampled.scored.scores,
                         scores=shaped.scores, ended=sampled.rollout.ended, kl=kl,
                         preference=shaped.preference)
        return Prepared(exp, issues=[check_kl_not_negative(kl.sum(-1))])

    def loss(self, parts: "OnlineParts", mb: Experience,
             out: Optional["PolicyOutput"]) -> tuple[Tensor, dict[str, Tensor]]:
        """The pair loss over the minibatch's pairs (unlabelled ones count as 0), with DPO's
        implicit rewards beta (log pi - log ref) summed over each response's tokens."""
        from tether.recipes.online.update import forward_policy

        cfg = self.cfg
        out = out if out is not None else forward_policy(parts, mb.seqs)
        mask = mb.mask.to(out.logprobs.dtype)
        logratio = ((out.logprobs - mb.ref_logprobs) * mask).sum(-1)  # (B,)
        first, second = logratio[0::2], logratio[1::2]
        sign = mb.preference[0::2]  # +1: the first row is the chosen one
        labelled = sign != 0
        chosen = torch.where(sign > 0, first, second)
        rejected = torch.where(sign > 0, second, first)
        losses = pair_losses(cfg.loss, chosen - rejected, cfg.beta, cfg.label_smoothing)
        loss = (losses * labelled).sum() / max(sign.numel(), 1)
        with torch.no_grad():
            n = labelled.sum().clamp(min=1)
            margin = cfg.beta * (chosen - rejected)
            stats = {"policy/loss": loss.detach(),
                     "rewards/chosen": (cfg.beta * chosen * labelled).sum() / n,
                     "rewards/rejected": (cfg.beta * rejected * labelled).sum() / n,
                     "rewards/margin": (margin * labelled).sum() / n,
                     "rewards/accuracy": ((margin > 0) & labelled).sum() / n}
        return loss, stats
