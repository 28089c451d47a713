"""The sampler-trainer mismatch: an inference engine (vLLM) samples the rollouts and reports the
log-probability of each token it drew, while the trainer computes pi_old with its own forward.
The two differ by kernels, precision and batching even on the same weights, so the rollouts come
from a distribution q that is not quite pi_old. Pure functions of tensors.

With d_t = log pi_old(y_t) - log q(y_t) on tokens y_t ~ q (Schulman's estimators, as `ops.kl`):

    mean |d|                       how far apart the two logprobs are, per token
    k3 = (e^d - 1) - d             an unbiased, non-negative estimate of KL(q || pi_old), per token

Truncated importance sampling (Yao et al., "Your efficient RL framework secretly brings you
off-policy RL training", 2025; verl's and TRL's TIS) reweights each token's policy-gradient term
by w_t = min(pi_old(y_t) / q(y_t), C): detached, capped at C, so a token the sampler drew far
more often than the trainer would is not over-counted, and one it drew too rarely is counted up
to C times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.ops.kl import kl_k3
from tether.ops.masking import masked_mean


def mismatch_stats(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """trainer_logprobs, sampler_logprobs, mask: (B, T), the tokens the sampler drew. Returns
    0-dim tensors: `rollout/mismatch_abs` (mean |d| per token), `rollout/mismatch_kl` (mean k3 per
    token, KL(sampler || trainer)) and `rollout/mismatch_max` (the largest |d| of any token)."""
    d = (trainer_logprobs - sampler_logprobs).float()
    real = mask.bool()
    largest = d.abs().masked_fill(~real, 0.0).max() if real.any() else d.new_zeros(())
    return {"rollout/mismatch_abs": masked_mean(d.abs(), mask),
            # k3 with the sampler as the distribution the tokens came from
            "rollout/mismatch_kl": masked_mean(kl_k3(sampler_logprobs.float(), trainer_logprobs.float()), mask),
            "rollout/mismatch_max": largest}


def truncated_is_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor,
                         cap: float) -> Tensor:
    """w_t = min(exp(log pi_old(y_t) - log q(y_t)), cap) on response tokens, 1 elsewhere: (B, T),
    detached. cap > 0 (2 is the usual choice)."""
    if cap <= 0:
        raise ValueError(f"the importance-sampling cap must be > 0, got {cap}")
    ratio = torch.exp((trainer_logprobs - sampler_logprobs).detach().float())
    return torch.where(mask.bool(), ratio.clamp(max=cap), torch.ones_like(ratio))
