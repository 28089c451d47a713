"""The few values processes agree on (stop flags, sums, maxima): one collective each, and no
collective at all when the run has a single process."""

from __future__ import annotations

from typing import Any

import torch


def any_process(accelerator: Any, flag: bool) -> bool:
    """True if `flag` is True on any process (so all processes stop together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def sum_across_processes(accelerator: Any, value: float) -> float:
    """`value` summed over every process (float64, so counts stay exact)."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum").item())


def max_across_processes(accelerator: Any, *values: float) -> list[float]:
    """Each value's largest across processes, in one collective."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], device=accelerator.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
