"""PPO's clipped policy and value losses (Schulman et al. 2017), masked to response tokens.

Stats are detached 0-dim tensors, not Python floats: calling .item() here would force a
CPU-GPU sync on every minibatch. The logger converts them once per step.
"""

import torch
from torch import Tensor

from tether.ops.masking import masked_mean


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float = 0.2,
) -> tuple[Tensor, dict]:
    """Clipped surrogate loss: masked mean of max(-A * rho, -A * clip(rho, 1-eps, 1+eps)),
    with rho = exp(logprobs - old_logprobs).

    Taking the max of the two losses is the pessimistic choice: once rho has moved more than
    eps in the direction the advantage favours, the gradient is cut off, but a move in the
    wrong direction is always penalised in full.

    Args:
        logprobs: shape (B, T), log pi_theta of the sampled tokens (with grad).
        old_logprobs: shape (B, T), log pi_old from the rollout.
        advantages: shape (B, T), usually whitened.
        mask: shape (B, T), 1 on response tokens.
        cliprange: eps.

    Returns:
        (loss 0-dim, stats) with stats `policy/clipfrac` (fraction of tokens where the
        clipped loss was the larger), `policy/approx_kl` (mean of 0.5 * (log rho)^2, an
        estimate of KL(pi_old || pi_theta)) and `policy/ratio_mean`.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float = 0.2,
) -> tuple[Tensor, dict]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2), where
    V_clip = clip(V, V_old - eps, V_old + eps).

    As with the policy, the max is pessimistic: the critic cannot get credit for moving
    further than eps from its rollout-time prediction in one update.

    Args:
        values: shape (B, T), V from the critic now (with grad).
        old_values: shape (B, T), V at rollout time.
        returns: shape (B, T), the GAE returns (A + V_old).
        mask: shape (B, T), 1 on response tokens.
        cliprange_value: eps_v, in the units of the reward.

    Returns:
        (loss 0-dim, stats) with `val/clipfrac` (fraction of tokens where the clipped loss
        was the larger) and `val/mean` (mean of values).
    """
    clipped_values = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {
            "val/clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask),
            "val/mean": masked_mean(values, mask),
        }
    return loss, stats
