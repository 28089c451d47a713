"""The optimizer side of a training step: building AdamW and the learning-rate schedule, keeping
the configured peak learning rate across a resume, and refusing a step that is not finite."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from tether.errors import ConfigError, TrainingError
from tether.training.checkpoint import latest_checkpoint


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float,
                   eps: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; a model with none is a configuration error."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    return adamw(params, lr=lr, weight_decay=weight_decay, eps=eps)


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all parameters) where torch has a fused kernel for
    them: on CPU that step is about 5x faster than the default multi-tensor one (22 ms -> 4 ms
    for 7M parameters), the same update up to float rounding. Other devices get the default."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fusable = bool(tensors) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, fused=fusable or None, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_ratio: float,
                   steps: int) -> Any:
    """transformers' schedule of that name; tether's 'constant' keeps the warmup."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * steps),
                         num_training_steps=steps)


def configured_peaks(optimizers: Sequence[Any]) -> list[list[float]]:
    """Each param group's peak learning rate as the optimizers were built from the config (a
    scheduler keeps it as `initial_lr`): read before a checkpoint's state replaces them."""
    return [[g.get("initial_lr", g["lr"]) for g in o.param_groups] for o in optimizers]


def apply_peak_lr(schedulers: Sequence[Any], optimizers: Sequence[Any],
                  peaks: Sequence[Sequence[float]]) -> None:
    """After a resume, make each param group's peak learning rate the configured one (a changed
    --lr takes effect), the schedule carrying on from the step reached: lr = peak x the
    schedule's factor at that step. Without a scheduler the rate is constant and set directly.
    peaks: per optimizer, per param group."""
    for i, (optimizer, group_peaks) in enumerate(zip(optimizers, peaks)):
        scheduler = schedulers[i] if i < len(schedulers) else None
        for g, (group, peak) in enumerate(zip(optimizer.param_groups, group_peaks)):
            if scheduler is None:
                group["lr"] = peak
                continue
            old = scheduler.base_lrs[g]
            factor = group["lr"] / old if old else 0.0
            scheduler.base_lrs[g] = peak
            group["initial_lr"] = peak
            group["lr"] = peak * factor
        if scheduler is not None:
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_step_finite(values: dict[str, Any], step: int | str, output_dir: str | Path,
                      discard: Any = None) -> None:
    """Stop before an optimizer step whose loss or gradient norm is NaN or inf: `discard()`
    drops the gradients, no weight changes, and the error names the last checkpoint (which is
    finite: non-finite weights are never written). Every process sees the same values (they
    are reduced across processes), so all stop together."""
    bad = {k: float(v) for k, v in values.items() if v is not None and not math.isfinite(float(v))}
    if not bad:
        return
    if discard is not None:
        discard()
    last = latest_checkpoint(output_dir)
    advice = (f"The last checkpoint, {last}, is intact and finite: lower --lr and rerun with "
              "--resume." if last else "No checkpoint was written yet: lower --lr and start again.")
    shown = ", ".join(f"{k} {v}" for k, v in bad.items())
    at = f"step {step}" if isinstance(step, int) else step
    raise TrainingError(f"the optimizer step of {at} was not taken: {shown}. No weight was "
                        f"changed. {advice} Also check the data for empty responses, or use "
                        "--dtype float32.")
