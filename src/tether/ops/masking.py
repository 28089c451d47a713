"""Reductions over masked tokens, whitening, and the response mask.

Masks are 0/1 (any dtype) or bool, with the same shape as the data. Masked-out entries are
removed with `torch.where`, not by multiplying with 0, because padding positions can hold
inf or NaN (e.g. a -inf logprob), and inf * 0 is NaN.
"""

from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import Tensor


def _zero_out(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over entries where mask is set. x, mask: same shape.
    Returns a 0-dim tensor when dim is None, else x's shape without `dim`."""
    x = _zero_out(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    m = mask.to(x.dtype)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask is set; 0 (not NaN) where the mask is empty.
    x, mask: same shape. Returns a 0-dim tensor when dim is None, else x's shape without
    `dim`. Stays on the device: no .item(), so no CPU-GPU sync."""
    return masked_sum(x, mask, dim) / _count(x, mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all entries where mask is set, as a 0-dim tensor.

    With unbiased=True the sum of squares is divided by n - 1 (Bessel), and fewer than 2
    entries give 0. With unbiased=False it is divided by n, and an empty mask gives 0.
    """
    n = _count(x, mask, None)
    sq = masked_sum((x - masked_mean(x, mask)) ** 2, mask)
    return _bessel(sq, n) if unbiased else sq / n.clamp(min=1)


def _bessel(sq: Tensor, n: Tensor) -> Tensor:
    """Sum of squared deviations -> unbiased variance; 0 for fewer than 2 entries. torch.where
    instead of an `if n < 2` keeps the count on the device."""
    return torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq))


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_reduce: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps), with mean and (unbiased) variance taken over the masked
    entries only, so padding does not drag the statistics.

    Args:
        x, mask: same shape, e.g. (B, T).
        shift_mean: False scales to unit variance but adds the mean back, as
            lm-human-preferences does for rewards (whitening would move their mean to 0).
        all_reduce: with several processes, a function that sums a tensor over all of them;
            the mean and variance are then those of every process's entries together, so N
            processes whiten as one process holding the whole batch would.
    Returns:
        x's shape; 0 at masked-out positions.
    """
    if all_reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mean, var = _global_mean_var(x, mask, all_reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_out(out, mask)


def _global_mean_var(x: Tensor, mask: Tensor,
                     all_reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of the masked entries of all processes: two all-reduces, the
    second of squares centred on the global mean (the two-pass form `masked_var` uses)."""
    total = all_reduce(torch.stack([masked_sum(x, mask), _count(x, mask, None)]))
    n = total[1]
    mean = total[0] / n.clamp(min=1)
    return mean, _bessel(all_reduce(masked_sum((x - mean) ** 2, mask)), n)


def response_mask(
    responses: Tensor, eos_token_ids: int | Iterable[int], pad_token_id: int | None = None
) -> Tensor:
    """Which generated tokens belong to the response: everything up to and including the
    first EOS. The EOS itself counts, so the policy is credited for choosing to stop.

    Args:
        responses: shape (B, T) long, the generated tokens (prompt not included).
        eos_token_ids: one id or several (chat models often stop on more than one).
        pad_token_id: has no effect on the result and is accepted for call-site clarity.
            Generation only pads after a row has finished, so padding always follows an EOS
            and is masked out. If the pad id is also an EOS id (GPT-2 style), it is treated
            as an EOS: its first occurrence ends the response and is included. A pad id that
            is not an EOS id is an ordinary token (a row without EOS is all 1).

    Returns:
        shape (B, T) long: 1 on the response, 0 after its first EOS. A row with no EOS is
        all 1 (it was truncated at the length limit).
    """
    del pad_token_id  # see the docstring: only the EOS ids decide
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    eos = torch.tensor(ids, dtype=responses.dtype, device=responses.device)
    is_eos = torch.isin(responses, eos)
    # The number of EOS tokens strictly before t; position t is kept while it is 0.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long()


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last set entry in each row of mask.

    Args:
        mask: shape (B, T), 0/1 or bool; usually one contiguous run of ones.
    Returns:
        shape (B,) long; 0 for a row with no set entry.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(-1)
