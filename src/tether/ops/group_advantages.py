"""Advantages of the critic-free methods, from G responses sampled per prompt.

Rows come in groups: rows g*G .. g*G + G - 1 answer prompt g. `scores` is each response's
sequence reward (reward model and/or reward functions, any length penalty included).

| estimator | advantage of response i of group g | paper |
|---|---|---|
| grpo | (r_i - mean_g) / std (`scale`: std_g of the group, std of all the batch's rewards, or none) | DeepSeekMath (Shao et al. 2024) |
| dr_grpo | r_i - mean_g (no std: the std favours easy and hard prompts) | Dr. GRPO (Liu et al. 2025) |
| rloo | r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g) | RLOO (Ahmadian et al. 2024) |
| reinforce_pp | per token: the return sum_{s >= t} rew_s of the KL-penalised token rewards, whitened over the batch | REINFORCE++ (Hu 2025) |
| reinforce_pp_baseline | as reinforce_pp, with the group mean score subtracted first | REINFORCE++-baseline |

std_g is the sample standard deviation (G - 1 in the denominator). A group whose rewards are
all equal carries no signal: its advantages are exactly 0, and nothing is divided by its
(near-)zero std.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tether.ops.masking import _global_mean_var, masked_var, masked_whiten

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
SEQUENCE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # one advantage per response


def grouped(scores: Tensor, group_size: int) -> Tensor:
    """(N,) -> (N / G, G); raises when N is not a multiple of G."""
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def zero_std_groups(scores: Tensor, group_size: int, tol: float = 0.0) -> Tensor:
    """(N / G,) bool: the groups whose rewards are all equal (max - min <= tol)."""
    g = grouped(scores, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) <= tol


def sequence_advantages(scores: Tensor, group_size: int, estimator: str = "grpo",
                        scale: str = "group", eps: float = 1e-4,
                        all_reduce: Optional[object] = None) -> Tensor:
    """One advantage per response: (N,) float32. scale: "group" divides by each group's std,
    "batch" by the std of all N (mean-centred) rewards, "none" by nothing. all_reduce: a sum
    over processes, for the batch std when the batch is spread over several."""
    if estimator not in SEQUENCE_ESTIMATORS:
        raise ValueError(f"{estimator!r} is not a sequence-level estimator ({', '.join(SEQUENCE_ESTIMATORS)})")
    g = grouped(scores.float(), group_size)
    G = group_size
    flat_group = zero_std_groups(scores, G)[:, None].expand_as(g)
    centred = g - g.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        centred = centred * (G / (G - 1)) if G > 1 else torch.zeros_like(centred)
    centred = torch.where(flat_group, torch.zeros_like(centred), centred)
    if scale == "group" and estimator != "dr_grpo":
        std = g.std(dim=1, keepdim=True) if G > 1 else torch.ones_like(g[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch" and estimator != "dr_grpo":  # group mean, batch std ("Lite PPO")
        flat = scores.float()
        ones = torch.ones_like(flat)
        var = masked_var(flat, ones) if all_reduce is None else _global_mean_var(flat, ones, all_reduce)[1]
        centred = centred / (var.sqrt() + eps)
    elif scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be group, batch or none; got {scale!r}")
    centred = torch.where(flat_group, torch.zeros_like(centred), centred)  # exactly 0, whatever eps
    return centred.reshape(-1)


def token_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """sum_{s >= t} rewards_s over each row's response tokens (gamma = 1): (B, T)."""
    r = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    return r.flip(-1).cumsum(-1).flip(-1) * mask


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor,
                            all_reduce: Optional[object] = None) -> Tensor:
    """REINFORCE++: the returns of the (KL-penalised) token rewards, whitened over every
    response token of the batch (across processes with `all_reduce`): (B, T)."""
    return masked_whiten(token_returns(token_rewards, mask), mask, all_reduce=all_reduce)


def baseline_scores(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE++-baseline's scores: each minus its group's mean (N,)."""
    g = grouped(scores.float(), group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the score: 0 up to max_length - buffer tokens,
    then falling linearly to -penalty at max_length: -penalty * (len - (max - buffer)) / buffer.
    lengths: (N,) response lengths in tokens. buffer 0 turns it off."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_length - buffer)).clamp(min=0.0)
    return -penalty * torch.clamp(over / buffer, max=1.0)
