"""The group methods (`tether grpo`, `tether rloo`): G responses per prompt, an advantage from
each response's own group, the clipped policy loss, no critic.

What is theirs is the advantage (`ops/group_advantages.py`: GRPO, Dr. GRPO, RLOO, REINFORCE++),
DAPO's length shaping and dynamic sampling, and the loss (`losses/policy_gradient.py`), chosen
by the config (docs/online.md gives each formula and its paper).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, Optional

import torch
from torch import Tensor

from tether.losses.policy_gradient import clipped_policy_loss
from tether.ops.advantages import kl_penalised_rewards
from tether.ops.group_advantages import (SEQUENCE_ESTIMATORS, baseline_scores, overlong_penalty,
                                         reinforce_pp_advantages, sequence_advantages,
                                         zero_std_groups)
from tether.recipes.online.algorithm import Algorithm, Prepared, Shaped
from tether.recipes.online.steps import Sampled, sample_and_score
from tether.rollout.health import check_kl_not_negative
from tether.rollout.score import RewardScores
from tether.rollout.types import Experience, Rollout

if TYPE_CHECKING:
    from tether.config import GRPOConfig
    from tether.recipes.online.setup import OnlineParts
    from tether.recipes.online.steps import OldPolicy, PhaseClock
    from tether.recipes.online.update import PolicyOutput

log = logging.getLogger("tether")


class GroupAlgorithm(Algorithm):
    name = "group"
    cfg: "GRPOConfig"

    @property
    def mean_over(self) -> Literal["tokens", "rows"]:  # type: ignore[override]
        return "tokens" if self.cfg.loss_aggregation == "token_mean" else "rows"

    def responses_per_prompt(self) -> int:
        return self.cfg.num_generations

    def shape(self, parts: "OnlineParts", step: int, clock: "PhaseClock", sampled: Sampled) -> Shaped:
        """DAPO's soft overlong punishment, then (--dynamic-sampling) the groups without reward
        variance replaced by fresh ones."""
        G = self.cfg.num_generations
        scores = shaped_scores(self.cfg, sampled)
        flat = zero_std_groups(scores, G)
        stats = {"objective/frac_reward_zero_std": flat.float().mean()}  # as sampled, before any refill
        if self.cfg.dynamic_sampling:
            rounds = 0
            if bool(flat.any()):
                sampled, scores, rounds = refill(parts, step, clock, sampled, scores)
            stats["response/resample_rounds"] = torch.tensor(float(rounds))
        return Shaped(sampled, scores, stats)

    def experience(self, parts: "OnlineParts", shaped: Shaped, old: "OldPolicy") -> Prepared:
        cfg, sampled, scores, G = self.cfg, shaped.sampled, shaped.scores, self.cfg.num_generations
        mask, logprobs, ref = sampled.rollout.response_mask, old.logprobs, sampled.ref_logprobs
        # 3. rewards: the KL per token goes into the reward (k1) or, later, into the loss
        beta, all_reduce = parts.kl_ctl.value, parts.all_reduce_sum()
        in_reward = beta if cfg.kl_in == "reward" else 0.0
        base = baseline_scores(scores, G) if cfg.advantage == "reinforce_pp_baseline" else scores
        rewards, kl = kl_penalised_rewards(logprobs, ref, base, mask, in_reward)
        # 4. advantages from the groups
        if cfg.advantage in SEQUENCE_ESTIMATORS:
            sequence_reward = scores - in_reward * kl.sum(-1)
            per_seq = sequence_advantages(sequence_reward, G, cfg.advantage, cfg.scale_rewards,
                                          all_reduce=all_reduce)
            advantages = per_seq[:, None] * mask
        else:
            advantages = reinforce_pp_advantages(rewards, mask, all_reduce=all_reduce)
        exp = Experience(sampled.seqs, logprobs, ref, rm_scores=sampled.scored.scores, scores=scores,
                         ended=sampled.rollout.ended, kl=kl, rewards=rewards, advantages=advantages)
        stats = {"response/truncated_frac": (~sampled.rollout.ended).float().mean()}
        return Prepared(exp, stats, [check_kl_not_negative(kl.sum(-1))])

    def loss(self, parts: "OnlineParts", mb: Experience,
             out: Optional["PolicyOutput"]) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic-free clipped loss on `mb`'s rows (losses/policy_gradient.py), with the KL in
        it when --kl-in loss."""
        from tether.recipes.online.update import forward_policy

        cfg = self.cfg
        out = out if out is not None else forward_policy(parts, mb.seqs)
        beta = parts.kl_ctl.value if cfg.kl_in == "loss" else 0.0
        loss, stats = clipped_policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.mask, cfg.epsilon,
                                          cfg.epsilon_high, cfg.importance_sampling, cfg.loss_aggregation,
                                          cfg.response_length, beta, mb.ref_logprobs, cfg.kl_estimator)
        return loss, {"policy/loss": loss.detach(), **stats}


def shaped_scores(cfg: "GRPOConfig", sampled: Sampled) -> Tensor:
    """The rewards with DAPO's soft overlong punishment added (none when --overlong-buffer 0)."""
    lengths = sampled.rollout.response_mask.sum(-1)
    penalty = overlong_penalty(lengths, cfg.response_length, cfg.overlong_buffer, cfg.overlong_penalty)
    return sampled.scored.scores + penalty.to(sampled.scored.scores)


def refill(parts: "OnlineParts", step: int, clock: "PhaseClock", first: Sampled,
           scores: Tensor) -> tuple[Sampled, Tensor, int]:
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal and sample more
    prompts (rounds 1, 2, ... of this iteration, `steps.sample_and_score`) until the batch holds
    as many groups with a learning signal as it was asked for, or --max-resample-rounds is
    spent. Then the batch is topped up with dropped groups (they add no policy gradient) and a
    warning says so. Returns the batch, its scores and the rounds used."""
    cfg, G = parts.cfg, parts.cfg.num_generations
    wanted = scores.numel() // G
    pieces = [(first, scores, (~zero_std_groups(scores, G)).nonzero().flatten().tolist())]
    have, rounds = len(pieces[0][2]), 0
    while have < wanted and rounds < cfg.max_resample_rounds:
        rounds += 1
        extra = sample_and_score(parts, step, clock, repeat=G, round_=rounds)
        extra_scores = shaped_scores(cfg, extra)
        useful = (~zero_std_groups(extra_scores, G)).nonzero().flatten().tolist()[:wanted - have]
        pieces.append((extra, extra_scores, useful))
        have += len(useful)
    if have < wanted:
        flat = zero_std_groups(scores, G).nonzero().flatten().tolist()[:wanted - have]
        pieces.append((first, scores, flat))
        log.warning("dynamic sampling: %d of %d groups at iteration %d have no reward variance "
                    "after %d extra round(s) (--max-resample-rounds); they stay in the batch",
                    len(flat), wanted, step, rounds)
    return merge_groups(parts, pieces), torch.cat(
        [s.view(-1, G)[groups].reshape(-1) for _, s, groups in pieces if groups]), rounds


def merge_groups(parts: "OnlineParts", pieces: list) -> Sampled:
    """One batch of the chosen groups of several sampling rounds."""
    G = parts.cfg.num_generations
    chosen = [(sampled, torch.tensor([g * G + k for g in groups for k in range(G)], dtype=torch.long))
              for sampled, _, groups in pieces if groups]
    rollout = Rollout.concat([s.rollout.rows(rows.to(s.rollout.ended.device)) for s, rows in chosen],
                             parts.tokenizer.pad_token_id)
    pick = lambda values, rows: [values[i] for i in rows.tolist()]  # noqa: E731
    texts = [t for s, rows in chosen for t in pick(s.texts, rows)]
    prompt_rows = [r for s, rows in chosen for r in pick(s.rows, rows)]
    scored = RewardScores(torch.cat([s.scored.scores[rows.to(s.scored.scores.device)] for s, rows in chosen]),
                          torch.cat([s.scored.noncanonical[rows.to(s.scored.noncanonical.device)]
                                     for s, rows in chosen]),
                          pieces[0][0].scored.metrics,  # the functions' view of the first draw
                          [t for s, rows in chosen for t in pick(s.scored.texts, rows)])
    T = rollout.response_ids.shape[1]  # (rounds of episodes differ in length: padded to the longest)
    widest = lambda t: torch.nn.functional.pad(t, (0, T - t.shape[1]))  # noqa: E731
    ref = torch.cat([widest(s.ref_logprobs[rows.to(s.ref_logprobs.device)]) for s, rows in chosen])
    stats = {k: torch.stack([torch.as_tensor(s.stats[k]) for s, _ in chosen]).mean()  # env/ metrics:
             for k in pieces[0][0].stats}                                          # the rounds' mean
    turns = None
    if pieces[0][0].turn_rewards is not None:  # --env: the chosen rows' per-turn rewards
        turns = torch.cat([widest(s.turn_rewards[rows.to(s.turn_rewards.device)]) for s, rows in chosen])
    return Sampled(prompt_rows, texts, rollout, rollout.sequences(), ref, scored, stats, turns)
