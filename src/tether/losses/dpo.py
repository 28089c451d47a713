"""Direct preference optimisation (Rafailov et al. 2023) and its family (docs/preference.md).

The pair losses are functions of one number per pair, the log-ratio margin

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)),

with sequence log-probabilities summed over the response tokens: sigmoid (DPO), ipo, robust
(rDPO), conservative (cDPO) and hinge (SLiC). The reference-free losses, simpo and orpo, take
length-normalised log-probabilities instead and need no reference model.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

PAIR_LOSSES = ("sigmoid", "ipo", "robust", "conservative", "hinge")
REFERENCE_FREE = ("simpo", "orpo")
LOSSES = PAIR_LOSSES + REFERENCE_FREE


def pair_losses(kind: str, logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Per-pair losses (shape of `logits`, usually (B,)) of the log-ratio margin h = `logits`.

    With eps = label_smoothing:

        sigmoid:       -log sigmoid(beta h)                                    (DPO)
        ipo:           (h - 1 / (2 beta))^2                                    (IPO)
        robust:        [(1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))] / (1 - 2 eps)
        conservative:  (1 - eps) (-log sigmoid(beta h)) + eps (-log sigmoid(-beta h))   (cDPO)
        hinge:         max(0, 1 - beta h)                                      (SLiC)

    h is NOT multiplied by beta by the caller: every kind applies beta itself. eps is the
    rate at which labels are taken to be flipped; it must be in [0, 0.5), and only robust and
    conservative use it. The robust loss is unbiased under such flips,
    (1 - eps) L(h) + eps L(-h) = -log sigmoid(beta h), and is unbounded below in h.
    """
    if kind not in PAIR_LOSSES:
        raise ValueError(f"pair loss must be one of {', '.join(PAIR_LOSSES)}; got {kind!r}")
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing (the label-noise rate eps) must be in [0, 0.5); got {eps}")
    z = beta * logits
    if kind == "sigmoid":
        return -F.logsigmoid(z)
    if kind == "ipo":
        return (logits - 1.0 / (2.0 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1.0 - z)
    right, flipped = -F.logsigmoid(z), -F.logsigmoid(-z)
    if kind == "robust":
        return ((1.0 - eps) * right - eps * flipped) / (1.0 - 2.0 * eps)
    return (1.0 - eps) * right + eps * flipped  # conservative


def _reward_stats(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Detached batch means of two (B,) reward tensors, their margin, and the accuracy."""
    with torch.no_grad():
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        }


def preference_loss(
    kind: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """mean(pair_losses(kind, (pc - rc) - (pr - rr), beta, label_smoothing)).

    Args:
        kind: one of PAIR_LOSSES.
        policy_chosen_logps, policy_rejected_logps: shape (B,), log pi_theta(y | x) summed
            over response tokens (see `sequence_logprobs`).
        ref_chosen_logps, ref_rejected_logps: shape (B,), the same under pi_ref.
        beta: temperature of the implicit reward beta * (log pi - log pi_ref).
        label_smoothing: eps of robust and conservative, in [0, 0.5).

    Returns:
        (loss 0-dim, stats) with detached `rewards/chosen`, `rewards/rejected` (batch means
        of the implicit rewards beta * (log pi - log pi_ref)), `rewards/margin` (mean of
        chosen - rejected) and `rewards/accuracy` (fraction where the chosen reward is the
        larger), whatever the kind.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = pair_losses(kind, chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses.mean(), _reward_stats(beta * chosen_logratios, beta * rejected_logratios)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict]:
    """-mean(log sigmoid(beta * ((pc - rc) - (pr - rr)))).

    beta * (log pi - log pi_ref) is the reward DPO's policy implicitly assigns, so the loss
    is the Bradley-Terry loss on implicit rewards. beta plays the role of the PPO KL
    coefficient: smaller beta lets the policy move further from the reference.

    Args:
        policy_chosen_logps, policy_rejected_logps: shape (B,), log pi_theta(y | x) summed
            over response tokens (see `sequence_logprobs`).
        ref_chosen_logps, ref_rejected_logps: shape (B,), the same under pi_ref.
        beta: temperature of the implicit reward.

    Returns:
        (loss 0-dim, stats) with detached `rewards/chosen`, `rewards/rejected` (batch means
        of the implicit rewards), `rewards/margin` (mean of chosen - rejected) and
        `rewards/accuracy` (fraction where the chosen reward is the larger).
    """
    return preference_loss("sigmoid", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps, beta)


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng et al. 2024): -mean(log sigmoid(beta (avg_w - avg_l) - gamma)).

    The reward is beta times the length-normalised log-probability, with no reference model;
    gamma is the target reward margin itself (the paper's gamma, not gamma / beta).

    Args:
        chosen_avg_logps, rejected_avg_logps: shape (B,), log pi_theta(y | x) / |y|, the mean
            log-probability per response token.
        beta: scale of the reward.
        gamma: the margin the chosen reward should exceed the rejected one by.

    Returns:
        (loss 0-dim, stats) with detached `rewards/chosen`, `rewards/rejected` (batch means
        of beta * avg), `rewards/margin` and `rewards/accuracy` (chosen reward the larger).
    """
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _reward_stats(chosen_rewards, rejected_rewards)


def log_odds(avg_logps: Tensor, max_logp: float = -1e-6) -> Tensor:
    """log(p / (1 - p)) with p = exp(avg): avg - log(1 - exp(avg)), computed as
    avg - log(-expm1(avg)). avg is clamped to at most `max_logp` (< 0) so it stays finite."""
    avg = avg_logps.clamp(max=max_logp)
    return avg - torch.log(-torch.expm1(avg))


def orpo_loss(
    chosen_nll: Tensor,
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    lam: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al. 2024): chosen_nll + lam * mean(-log sigmoid(log odds_w - log odds_l)),

    with log odds(y) = avg - log(1 - exp(avg)) (`log_odds`), avg the mean per-token
    log-probability of y. No reference model.

    Args:
        chosen_nll: 0-dim, the SFT loss: the mean NLL of the chosen responses.
        chosen_avg_logps, rejected_avg_logps: shape (B,), mean log-probability per token (< 0).
        lam: weight lambda of the odds-ratio term.

    Returns:
        (loss 0-dim, stats) with detached `orpo/nll` (chosen_nll), `orpo/odds_ratio_loss` (the
        term before lam), `orpo/log_odds_ratio` (mean log odds_w - log odds_l), and, as the
        paper reports them, `rewards/chosen` / `rewards/rejected` = batch means of lam * avg,
        `rewards/margin` (their difference) and `rewards/accuracy` (fraction with
        log odds_w > log odds_l).
    """
    log_odds_ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio).mean()
    loss = chosen_nll + lam * odds_ratio_loss
    with torch.no_grad():
        chosen_rewards, rejected_rewards = lam * chosen_avg_logps, lam * rejected_avg_logps
        stats = {
            "orpo/nll": chosen_nll.detach(),
            "orpo/odds_ratio_loss": odds_ratio_loss.detach(),
            "orpo/log_odds_ratio": log_odds_ratio.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (log_odds_ratio > 0).float().mean(),
        }
    return loss, stats
