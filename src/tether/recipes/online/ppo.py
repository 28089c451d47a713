"""PPO (`tether ppo`, SPEC stage 3): one response per prompt, a critic, per-token rewards with
the KL penalty, GAE advantages, the clipped policy and value losses (docs/ppo.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from tether.losses.ppo import policy_loss, value_loss
from tether.ops.advantages import gae
from tether.ops.kl import AdaptiveKLController
from tether.ops.masking import masked_whiten
from tether.recipes.online.algorithm import Algorithm, CriticKind, KLController, Prepared, Shaped
from tether.rollout.health import check_kl_not_negative, check_reward_layout
from tether.rollout.types import Experience

if TYPE_CHECKING:
    from tether.config import PPOConfig
    from tether.recipes.online.setup import OnlineParts
    from tether.recipes.online.steps import OldPolicy, PhaseClock, Sampled
    from tether.recipes.online.update import PolicyOutput


class PPO(Algorithm):
    name = "ppo"
    cfg: "PPOConfig"

    def critic(self) -> CriticKind:
        return self.cfg.critic

    def kl_controller(self) -> KLController:
        if self.cfg.kl_target is None:
            return super().kl_controller()
        return AdaptiveKLController(self.cfg.kl_coef, self.cfg.kl_target, self.cfg.kl_horizon)

    def ptx_source(self) -> Optional[str]:
        return self.cfg.ptx_data

    def shape(self, parts: "OnlineParts", step: int, clock: "PhaseClock", sampled: "Sampled") -> Shaped:
        """The missing-EOS penalty replaces the score of a response that never ended."""
        scores = sampled.scored.scores
        if self.cfg.missing_eos_penalty is not None:
            scores = torch.where(sampled.rollout.ended, scores,
                                 torch.full_like(scores, self.cfg.missing_eos_penalty))
        return Shaped(sampled, scores)

    def experience(self, parts: "OnlineParts", shaped: Shaped, old: "OldPolicy") -> Prepared:
        cfg, sampled = self.cfg, shaped.sampled
        mask, logprobs, ref = sampled.rollout.response_mask, old.logprobs, sampled.ref_logprobs
        # 3. per-token rewards: -beta * k1 on every response token, the score at the last one
        #    (with --env, each step's reward at the end of its turn, the rest at the last token)
        beta, all_reduce = parts.kl_ctl.value, parts.all_reduce_sum()
        at_end, turns = shaped.scores, sampled.turn_rewards
        if turns is not None:
            kept = torch.ones_like(sampled.rollout.ended) if cfg.missing_eos_penalty is None \
                else sampled.rollout.ended  # a replaced score replaces the turns' rewards too
            turns = turns * kept[:, None]
            at_end = at_end - turns.sum(-1)
        rewards, kl = parts.token_rewards(logprobs, ref, at_end, mask, beta)
        issues = [check_reward_layout(rewards, logprobs, ref, at_end, mask, beta),
                  check_kl_not_negative(kl.sum(-1))]
        if turns is not None:
            rewards = rewards + turns
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
        # 4. advantages: GAE over response tokens, whitened over the global batch; returns = A + V
        advantages, returns = gae(rewards, old.values, mask, cfg.gamma, cfg.lam)
        exp = Experience(sampled.seqs, logprobs, ref, rm_scores=sampled.scored.scores, scores=shaped.scores,
                         ended=sampled.rollout.ended, kl=kl, rewards=rewards,
                         advantages=masked_whiten(advantages, mask, all_reduce=all_reduce),
                         values=old.values, returns=returns)
        return Prepared(exp, issues=issues)

    def loss(self, parts: "OnlineParts", mb: Experience,
             out: Optional["PolicyOutput"]) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped policy loss plus vf_coef times the clipped value loss, on `mb`'s rows."""
        from tether.recipes.online.update import forward_policy

        cfg = self.cfg
        out = out if out is not None else forward_policy(parts, mb.seqs)
        p_loss, p_stats = policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.mask, cfg.cliprange)
        v_loss, v_stats = value_loss(out.values, mb.values, mb.returns, mb.mask, cfg.cliprange_value)
        stats = {"policy/loss": p_loss.detach(), "val/loss": v_loss.detach(), **p_stats, **v_stats}
        return p_loss + cfg.vf_coef * v_loss, stats
