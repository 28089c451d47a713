"""The critic-free iteration (`tether grpo`, `tether rloo`): G responses per prompt, an advantage
from each response's own group, the clipped policy loss, no critic.

It shares the loop's sampling, scoring, update step, metrics, KL control and health checks
(`loop.sample_and_score`, `update.ppo_update`, `loop.finish_iteration`); what is its own is the
advantage (`ops/group_advantages.py`) and the loss (`losses/policy_gradient.py`), chosen by the
config (docs/online.md gives each formula and its paper).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from tether.ops.advantages import kl_penalised_rewards
from tether.ops.group_advantages import (SEQUENCE_ESTIMATORS, baseline_scores, overlong_penalty,
                                         reinforce_pp_advantages, sequence_advantages,
                                         zero_std_groups)
from tether.recipes.online.loop import IterationResult, PhaseClock, finish_iteration, sample_and_score
from tether.recipes.online.update import forward_policy, mean_entropy, ppo_update, score_old_policy
from tether.rollout.health import check_kl_not_negative
from tether.rollout.types import Experience

# PPO's critic metrics have no meaning without a critic
NO_CRITIC = ("val/explained_var",)


def run_critic_free_iteration(parts: Any, step: int) -> IterationResult:
    cfg, clock = parts.cfg, PhaseClock(parts.device)
    G = cfg.num_generations
    # 1-2. G rollouts per prompt (the copies next to each other), reference logprobs, rewards,
    #      DAPO's soft overlong punishment
    sampled = sample_and_score(parts, step, clock, repeat=G)
    rollout, seqs, ref_logprobs, scored = sampled.rollout, sampled.seqs, sampled.ref_logprobs, sampled.scored
    mask = rollout.response_mask
    scores = scored.scores + overlong_penalty(mask.sum(-1), cfg.response_length, cfg.overlong_buffer,
                                              cfg.overlong_penalty).to(scored.scores)
    # 2b. pi_old: the first update forward when there is one minibatch in one micro-batch
    first = None
    if cfg.reuses_first_forward:
        clock.lap("score")
        first = forward_policy(parts, seqs)
        clock.lap("update")
        logprobs = first.logprobs.detach()
        entropy = mean_entropy(first.logits, mask, cfg.temperature)
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
    clock.lap("score")
    # 5. update: --ppo-epochs passes of the clipped loss; truncated responses left out of it
    #    with --mask-truncated
    train = exp
    if cfg.mask_truncated:
        kept = seqs.response_mask * rollout.ended[:, None].to(seqs.response_mask.dtype)
        train = replace(exp, seqs=replace(seqs, response_mask=kept))  # the forward ignores it
    update_stats = ppo_update(parts, train, step, first)
    parts.generator.sync_weights()
    clock.lap("update")
    stats = {
        "objective/entropy": entropy,
        "objective/frac_reward_zero_std": zero_std_groups(scores, G).float().mean(),
        "response/truncated_frac": (~rollout.ended).float().mean(),
        "response/noncanonical_frac": scored.noncanonical.float().mean(),
        **scored.metrics, **update_stats,
    }
    issues = [check_kl_not_negative(kl.sum(-1))]
    return finish_iteration(parts, step, exp, stats, issues, clock, sampled.texts, drop=NO_CRITIC)
