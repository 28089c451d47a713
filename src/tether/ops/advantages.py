"""Per-token PPO rewards with a KL penalty, and generalised advantage estimation."""

import torch
from torch import Tensor

from tether.ops.kl import kl_k1
from tether.ops.masking import last_token_index


def kl_penalised_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """R_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)), plus the sequence score on the
    last response token only.

    The score is a judgement of the whole response, so it is paid once, when the response
    ends; spreading it over every token would credit early tokens as if each had earned it.

    Args:
        logprobs: shape (B, T), log pi_old of the sampled response tokens.
        ref_logprobs: shape (B, T), log pi_ref of the same tokens (same temperature).
        scores: shape (B,), the (calibrated) reward-model score of each response.
        mask: shape (B, T), 1 on response tokens.
        kl_coef: beta, >= 0.

    Returns:
        (rewards, kl), both shape (B, T) and 0 at masked-out positions. kl is the k1 estimate
        (unbiased for the sequence KL when summed over a row).
    """
    real = mask.bool()
    kl = kl_k1(logprobs, ref_logprobs)
    kl = torch.where(real, kl, torch.zeros_like(kl))  # where, not *: pads may hold inf
    rewards = -kl_coef * kl
    last = last_token_index(real).unsqueeze(-1)  # (B, 1)
    # A row with no response token gets no score: last_token_index points at a pad there.
    score = torch.where(real.any(-1), scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(-1, last, score.unsqueeze(-1)), kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where
    t+1 is the next *unmasked* position. After the last response token the episode is over,
    so V and A there are 0. Masked-out positions are skipped entirely: their rewards and
    values (often garbage from padding) never enter the sums.

    Args:
        rewards: shape (B, T), per-token rewards (e.g. from `kl_penalised_rewards`).
        values: shape (B, T), V(x, y_<t) from the critic at the time of sampling.
        mask: shape (B, T), 1 on response tokens.
        gamma: discount; 1.0 for RLHF since episodes are short and the score comes at the end.
        lam: the GAE bias/variance trade-off; 1.0 gives Monte Carlo returns minus V.

    Returns:
        (advantages, returns), both shape (B, T), 0 at masked-out positions;
        returns = advantages + values, the critic's regression target.
    """
    real = mask.bool()
    next_value = torch.zeros_like(values[:, 0])  # (B,): V after the end of the episode is 0
    next_adv = torch.zeros_like(values[:, 0])
    per_step = []
    # Backwards over T (the response length), vectorised over the batch.
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        keep = real[:, t]
        per_step.append(torch.where(keep, adv, torch.zeros_like(adv)))
        # A masked-out step passes the bootstrap through untouched, as if it were not there.
        next_value = torch.where(keep, values[:, t], next_value)
        next_adv = torch.where(keep, adv, next_adv)
    advantages = torch.stack(per_step[::-1], dim=1)
    returns = torch.where(real, advantages + values, torch.zeros_like(values))
    return advantages, returns
