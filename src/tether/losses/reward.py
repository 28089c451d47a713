"""Reward-model losses: Bradley-Terry on pairs, and InstructGPT's K-wise ranking loss."""

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, dict]:
    """Bradley-Terry loss: -mean(log sigmoid(chosen - rejected - margin)).

    Args:
        chosen_scores: shape (B,), r(x, y_w).
        rejected_scores: shape (B,), r(x, y_l).
        margin: None or shape (B,); a larger margin asks for a larger gap (Llama 2).

    Returns:
        (loss 0-dim, stats) with `rm/accuracy` (fraction where chosen > rejected; ties count
        as wrong) and `rm/margin_mean` (mean of chosen - rejected). Stats are detached.
    """
    diff = chosen_scores - rejected_scores
    target = diff if margin is None else diff - margin
    # logsigmoid, not log(sigmoid(.)): sigmoid underflows to 0 for a gap below about -100.
    loss = -F.logsigmoid(target).mean()
    with torch.no_grad():
        stats = {"rm/accuracy": (diff > 0).float().mean(), "rm/margin_mean": diff.mean()}
    return loss, stats


def _ranked_pairs(ranks: Tensor, valid: Tensor) -> Tensor:
    """(G, K) ranks and valid -> (G, K, K) bool, True where response i is ranked strictly
    above response j and both are real responses."""
    above = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # rank 0 is best
    return above & valid.unsqueeze(2) & valid.unsqueeze(1)


def kwise_loss(
    scores: Tensor, ranks: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, dict]:
    """InstructGPT's ranking loss: per prompt, the mean of -log sigmoid(s_i - s_j) over all
    pairs with i ranked above j; then the mean over prompts.

    All K responses of a prompt are scored in one forward pass, and the prompt counts once
    in the mean however many pairs it has, so prompts with many responses do not dominate
    (and do not overfit, as they did in InstructGPT when pairs were shuffled separately).

    Args:
        scores: shape (G, K), the scores of K responses for each of G prompts.
        ranks: shape (G, K) long, 0 for the best response; equal ranks form no pair.
        valid: shape (G, K) bool, False on padding responses of prompts with fewer than K;
            None means all valid.

    Returns:
        (loss 0-dim, stats) with `rm/accuracy` (fraction of all pairs in the batch, pooled,
        where s_i > s_j) and `rm/num_pairs`. Prompts without a single pair are left out of
        the mean; a batch with no pair at all gives loss 0.
    """
    if valid is None:
        valid = torch.ones_like(ranks, dtype=torch.bool)
    pairs = _ranked_pairs(ranks, valid)  # (G, K, K)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (G, K, K): s_i - s_j
    pair_losses = torch.where(pairs, -F.logsigmoid(diff), torch.zeros_like(diff))
    pairs_per_prompt = pairs.sum((1, 2))  # (G,)
    per_prompt = pair_losses.sum((1, 2)) / pairs_per_prompt.clamp(min=1)
    has_pairs = (pairs_per_prompt > 0).to(per_prompt.dtype)
    loss = (per_prompt * has_pairs).sum() / has_pairs.sum().clamp(min=1)
    with torch.no_grad():
        num_pairs = pairs.sum()
        correct = (pairs & (diff > 0)).sum()
        stats = {
            "rm/accuracy": correct.float() / num_pairs.clamp(min=1),
            "rm/num_pairs": num_pairs,
        }
    return loss, stats
