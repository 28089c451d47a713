"""Direct preference optimisation (Rafailov et al. 2023)."""

import torch
import torch.nn.functional as F
from torch import Tensor


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
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    with torch.no_grad():
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        }
    return loss, stats
