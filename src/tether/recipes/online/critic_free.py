"""The critic-free iteration (`tether grpo`, `tether rloo`): G responses per prompt, an advantage
from each response's own group, the clipped policy loss, no critic.

It shares the loop's sampling, scoring, update step, metrics, KL control and health checks
(`loop.sample_and_score`, `update.ppo_update`, `loop.finish_iteration`); what is its own is the
advantage (`ops/group_advantages.py`) and the loss (`losses/policy_gradient.py`), chosen by the
config (docs/online.md gives each formula and its paper).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from tether.ops.advantages import kl_penalised_rewards
from tether.ops.group_advantages import (SEQUENCE_ESTIMATORS, baseline_scores, overlong_penalty,
                                         reinforce_pp_advantages, sequence_advantages,
                                         zero_std_groups)
from tether.recipes.online.loop import (IterationResult, PhaseClock, Sampled, finish_iteration,
                                        sample_and_score, sampler_correction)
from tether.recipes.online.update import forward_policy, mean_entropy, ppo_update, score_old_policy
from tether.rollout.health import check_kl_not_negative
from tether.rollout.score import RewardScores
from tether.rollout.types import Experience, Rollout

log = logging.getLogger("tether")

# PPO's critic metrics have no meaning without a critic
NO_CRITIC = ("val/explained_var",)


def shaped_scores(cfg: Any, sampled: Sampled) -> torch.Tensor:
    """The rewards with DAPO's soft overlong punishment added (none when --overlong-buffer 0)."""
    lengths = sampled.rollout.response_mask.sum(-1)
    penalty = overlong_penalty(lengths, cfg.response_length, cfg.overlong_buffer, cfg.overlong_penalty)
    return sampled.scored.scores + penalty.to(sampled.scored.scores)


def refill(parts: Any, step: int, clock: PhaseClock, first: Sampled,
           scores: torch.Tensor) -> tuple[Sampled, torch.Tensor, int]:
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal and sample more
    prompts (rounds 1, 2, ... of this iteration, `loop.sample_and_score`) until the batch holds
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


def merge_groups(parts: Any, pieces: list) -> Sampled:
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
    ref = torch.cat([s.ref_logprobs[rows.to(s.ref_logprobs.device)] for s, rows in chosen])
    return Sampled(prompt_rows, texts, rollout, rollout.sequences(), ref, scored)


def run_critic_free_iteration(parts: Any, step: int) -> IterationResult:
    cfg, clock = parts.cfg, PhaseClock(parts.device)
    G = cfg.num_generations
    # 1-2. G rollouts per prompt (the copies next to each other), reference logprobs, rewards,
    #      DAPO's soft overlong punishment
    sampled = sample_and_score(parts, step, clock, repeat=G)
    scores = shaped_scores(cfg, sampled)
    flat = zero_std_groups(scores, G)
    flat_first = flat.float().mean()
    rounds = 0
    if cfg.dynamic_sampling and bool(flat.any()):
        sampled, scores, rounds = refill(parts, step, clock, sampled, scores)
    rollout, seqs, ref_logprobs, scored = sampled.rollout, sampled.seqs, sampled.ref_logprobs, sampled.scored
    mask = rollout.response_mask
    # 2b. pi_old: the first update forward when there is one minibatch in one micro-batch
    first = None
    if cfg.reuses_first_forward:
        clock.lap("score")
        first = forward_policy(parts, seqs, entropy=True)
        clock.lap("update")
        logprobs = first.logprobs.detach()
        entropy = mean_entropy(first, mask)
    else:
        logprobs, _, entropy = score_old_policy(parts, seqs, chunk=cfg.micro_batch_size)
    # 3. rewards: the KL per token goes into the reward (k1) or, later, into the loss
    beta, all_reduce = parts.kl_ctl.value, parts.all_reduce_sum()
    in_reward = beta if cfg.kl_in == "reward" else 0.0
    base = baseline_scores(scores, G) if cfg.advantage == "reinforce_pp_baseline" else scores
    rewards, kl = kl_penalised_rewards(logprobs, ref_logprobs, base, mask, in_reward)
    # 4. advantages from the groups
    if cfg.advantage in SEQUENCE_ESTIMATORS:
        sequence_reward = scores - in_reward * kl.sum(-1)
        per_seq = sequence_advantages(sequence_reward, G, cfg.advantage, cfg.scale_rewards,
                                      all_reduce=all_reduce)
        advantages = per_seq[:, None] * mask
    else:
        advantages = reinforce_pp_advantages(rewards, mask, all_reduce=all_reduce)
    zeros = torch.zeros_like(logprobs)
    exp = Experience(seqs, logprobs, ref_logprobs, zeros, scored.scores, scores, rollout.ended, kl,
                     rewards, advantages, zeros)
    mismatch, train = sampler_correction(cfg, rollout, exp)
    clock.lap("score")
    # 5. update: --ppo-epochs passes of the clipped loss; truncated responses left out of it
    #    with --mask-truncated
    if cfg.mask_truncated:
        kept = seqs.response_mask * rollout.ended[:, None].to(seqs.response_mask.dtype)
        train = replace(train, seqs=replace(seqs, response_mask=kept))  # the forward ignores it
    update_stats = ppo_update(parts, train, step, first)
    clock.lap("update")
    parts.generator.sync_weights()
    clock.lap("weight_sync")
    stats = {
        "objective/entropy": entropy,
        "objective/frac_reward_zero_std": flat_first,  # as sampled, before any refill
        "response/truncated_frac": (~rollout.ended).float().mean(),
        "response/noncanonical_frac": scored.noncanonical.float().mean(),
        **scored.metrics, **mismatch, **update_stats,
    }
    if cfg.dynamic_sampling:
        stats["response/resample_rounds"] = torch.tensor(float(rounds))
    issues = [check_kl_not_negative(kl.sum(-1))]
    return finish_iteration(parts, step, exp, stats, issues, clock, sampled.texts, drop=NO_CRITIC)
