"""Per-iteration statistics of a batch of rollouts (the objective/, response/ and val/ metrics).

Everything stays a 0-dim tensor until the recipe logs it, so a GPU run syncs once per iteration.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tether.ops.masking import masked_mean, masked_var
from tether.rollout.types import Experience


def distinct_ngrams(tokens: Tensor, mask: Tensor, n: int = 2) -> Tensor:
    """Unique token n-grams / all n-grams over the batch's responses (0 when there are none).

    tokens, mask: (B, T); an n-gram counts when all its tokens are in the mask. Returns a 0-dim
    float tensor. 1.0 means no n-gram repeats anywhere in the batch; a collapsing policy that
    says the same thing every time drives it toward 0.
    """
    B, T = tokens.shape
    if T < n:
        return torch.zeros((), device=tokens.device)
    vocab = int(tokens.max()) + 1
    code = torch.zeros((B, T - n + 1), dtype=torch.long, device=tokens.device)
    valid = torch.ones_like(code, dtype=torch.bool)
    for i in range(n):  # n is 2 or 3: a loop over the n-gram width, not over tokens
        code = code * vocab + tokens[:, i:T - n + 1 + i]
        valid &= mask[:, i:T - n + 1 + i].bool()
    grams = code[valid]
    if grams.numel() == 0:
        return torch.zeros((), device=tokens.device)
    return torch.unique(grams).numel() / torch.tensor(float(grams.numel()), device=tokens.device)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 is a perfect critic,
    0 is no better than predicting the mean, below 0 is worse than that. (B, T) -> 0-dim."""
    var_returns = masked_var(returns, mask)
    residual = masked_var(returns - values, mask)
    return torch.where(var_returns > 0, 1 - residual / var_returns.clamp(min=1e-12),
                       torch.zeros_like(var_returns))


def batch_wide_metrics(response_ids: Tensor, mask: Tensor, rm_scores: Tensor,
                       values: Optional[Tensor] = None, returns: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The metrics that are not means over rollouts or tokens, so that several processes must
    compute them on the gathered global batch: the RM score spread, distinct-2 and, with a
    critic, explained variance. (B, T) tensors and rm_scores (B,)."""
    out = {
        "objective/rm_score_std": rm_scores.std() if rm_scores.numel() > 1 else torch.zeros(()),
        "response/distinct_2": distinct_ngrams(response_ids, mask, 2),
    }
    if values is not None:
        out["val/explained_var"] = explained_variance(values, returns, mask)
    return out


def experience_metrics(exp: Experience, kl_coef: float,
                       wide: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """objective/, response/ and (with a critic) val/explained_var metrics of one iteration's
    buffer. wide: the
    `batch_wide_metrics` to report, when they were taken over more than this buffer (the
    gathered batch of several processes); by default they are this buffer's."""
    mask = exp.mask
    kl_per_seq = exp.kl.sum(-1)
    if wide is None:
        wide = batch_wide_metrics(exp.seqs.response_ids, mask, exp.rm_scores, exp.values, exp.returns)
    out = {
        "objective/kl": kl_per_seq.mean(),
        "objective/kl_per_token": masked_mean(exp.kl, mask),
        "objective/rm_score": exp.rm_scores.mean(),
        "objective/rm_score_std": wide["objective/rm_score_std"],
        "objective/rlhf_reward": (exp.scores - kl_coef * kl_per_seq).mean(),
        "objective/kl_coef": torch.tensor(float(kl_coef)),
        "response/length": mask.sum(-1).float().mean(),
        "response/eos_rate": exp.ended.float().mean(),
        "response/distinct_2": wide["response/distinct_2"],
    }
    if "val/explained_var" in wide:
        out["val/explained_var"] = wide["val/explained_var"]
    return out
