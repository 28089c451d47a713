"""The clipped policy-gradient loss of the critic-free methods (GRPO, Dr. GRPO, DAPO, RLOO,
REINFORCE++, GSPO), with the options that tell them apart. Pure functions of tensors.

Per token, with ratio rho (see `importance`) and advantage A:

    l_t = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))

- `importance="token"`: rho_t = pi(y_t) / pi_old(y_t), as PPO and GRPO.
- `importance="sequence"`: GSPO's length-normalised sequence ratio, the same for every token of
  response i: s_i = exp(mean_t log(pi(y_t) / pi_old(y_t))).
- eps_high > eps_low is DAPO's clip-higher (room for unlikely tokens to grow).

The per-token losses are then reduced (`aggregation`):

| mode | loss | used by |
|---|---|---|
| token_mean | sum_{i,t} l_it / sum_i |y_i| | DAPO (every token weighs the same) |
| seq_mean_token_mean | mean_i (sum_t l_it / |y_i|) | GRPO as published |
| seq_mean_token_sum_norm | mean_i (sum_t l_it) / L, L = the response-length limit | Dr. GRPO (no length bias) |

With the KL in the loss (GRPO), beta times the k3 (or k2) estimate of KL(pi || pi_ref) per
token is added to l_t before the reduction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tether.ops.kl import kl_k2, kl_k3
from tether.ops.masking import masked_mean

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = {"k3": kl_k3, "k2": kl_k2}


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_tokens: Optional[int] = None) -> Tensor:
    """Reduce (B, T) per-token losses over the masked tokens as `mode` says: 0-dim."""
    m = mask.to(per_token.dtype)
    summed = (per_token * m).sum(-1)  # (B,)
    if mode == "token_mean":
        return summed.sum() / m.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return (summed / m.sum(-1).clamp(min=1)).mean()
    if mode == "seq_mean_token_sum_norm":
        return summed.mean() / float(max_tokens or per_token.shape[-1])
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {mode!r}")


def log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, importance: str = "token") -> Tensor:
    """log rho per token (B, T): the token's own, or its response's mean (GSPO)."""
    per_token = logprobs - old_logprobs
    if importance == "token":
        return per_token
    if importance == "sequence":
        m = mask.to(per_token.dtype)
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq[:, None].expand_as(per_token)
    raise ValueError(f"importance must be token or sequence; got {importance!r}")


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        eps_low: float = 0.2, eps_high: Optional[float] = None,
                        importance: str = "token", aggregation: str = "token_mean",
                        max_tokens: Optional[int] = None, kl_coef: float = 0.0,
                        ref_logprobs: Optional[Tensor] = None,
                        kl_estimator: str = "k3") -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of the module docstring: (0-dim loss, detached stats).

    Args: logprobs (B, T) with grad; old_logprobs (B, T) from the rollout; advantages (B, T)
    (a sequence advantage broadcast over its tokens, or per-token ones); mask (B, T), 1 on the
    tokens that count; ref_logprobs (B, T) when kl_coef > 0.
    Stats: policy/clipfrac, policy/clip_ratio_low (the share of tokens held at 1 - eps_low
    with A < 0), policy/clip_ratio_high (held at 1 + eps_high with A > 0), policy/approx_kl,
    policy/ratio_mean, and policy/kl_loss when the KL is in the loss.
    """
    eps_high = eps_low if eps_high is None else eps_high
    lr = log_ratio(logprobs, old_logprobs, mask, importance)
    ratio = torch.exp(lr)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    unclipped, clipped = -advantages * ratio, -advantages * clipped_ratio
    per_token = torch.maximum(unclipped, clipped)
    stats: dict[str, Tensor] = {}
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
        stats["policy/kl_loss"] = masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, aggregation, max_tokens)
    with torch.no_grad():
        stats.update({
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/clip_ratio_low": masked_mean(((ratio < 1.0 - eps_low) & (advantages < 0)).float(), mask),
            "policy/clip_ratio_high": masked_mean(((ratio > 1.0 + eps_high) & (advantages > 0)).float(), mask),
            "policy/approx_kl": masked_mean(0.5 * (logprobs - old_logprobs).detach() ** 2, mask),
            "policy/ratio_mean": masked_mean(ratio.detach(), mask),
        })
    return loss, stats
