"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): a loss on unpaired examples, each
one response labelled desirable or undesirable (docs/preference.md)."""

import torch
from torch import Tensor


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z0 = max(0, mean(policy_kl_logps - ref_kl_logps)), detached, 0-dim.

    The inputs are sequence log-probabilities (summed over response tokens) of mismatched
    (prompt, completion) pairs under the policy and the reference: the mean is the paper's
    estimate of KL(pi || ref). No gradient flows through z0.

    Args:
        policy_kl_logps, ref_kl_logps: shape (B,).
    """
    with torch.no_grad():
        return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    z0: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example KTO losses, with r = policy_logps - ref_logps:

        desirable:    desirable_weight   * (1 - sigmoid(beta (r - z0)))
        undesirable:  undesirable_weight * (1 - sigmoid(beta (z0 - r)))

    Args:
        policy_logps, ref_logps: shape (B,), log pi(y | x) summed over response tokens, under
            the policy (with grad) and the reference.
        desirable: shape (B,) bool, True where the example's response is desirable.
        z0: 0-dim reference point (`kto_reference_point`); taken as a constant.
        beta: scale of the implicit reward beta * r.
        desirable_weight, undesirable_weight: lambda_D and lambda_U.

    Returns:
        (losses (B,), stats): per-example losses (the caller sums or averages them) and
        detached 0-dim stats `kto/z0`, `rewards/desirable` / `rewards/undesirable` (mean of
        beta * r over the desirable / undesirable rows, 0 where there are none) and
        `kto/desirable_frac`.
    """
    desirable = desirable.bool()
    z0 = z0.detach()
    r = policy_logps - ref_logps
    # 1 - sigmoid(x) = sigmoid(-x)
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (r - z0))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - r))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    with torch.no_grad():
        rewards = beta * r
        d = desirable.to(rewards.dtype)
        u = 1.0 - d
        stats = {
            "kto/z0": z0,
            "rewards/desirable": (rewards * d).sum() / d.sum().clamp(min=1),
            "rewards/undesirable": (rewards * u).sum() / u.sum().clamp(min=1),
            "kto/desirable_frac": d.mean(),
        }
    return losses, stats
