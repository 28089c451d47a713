"""The supervised training loop shared by SFT, the reward model and DPO.

A recipe supplies the pieces (model, examples, a collate function and a loss function); this
loop owns what every such stage needs done the same way: deterministic data order, gradient
accumulation, loss normalisation that is exact across processes, clipping, the LR schedule,
metrics, evaluation, atomic checkpoints, exact resume, and a clean exit on SIGINT/SIGTERM.

Loss convention: `loss_fn(model, batch)` returns `(loss_sum, stat_sums)` summed over the batch's
loss units (scored tokens for SFT, pairs for the RM and DPO), and `weight_fn(batch)` counts those
units. The loop divides by the unit count of the whole global batch, so 1 process with batch 8
and 2 processes with batch 4 compute the same gradient.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from tether.config import to_dict
from tether.errors import Interrupted
from tether.training.batches import GlobalBatches, total_steps
from tether.training.checkpoint import load_checkpoint, save_checkpoint
from tether.training.collectives import any_process, max_across_processes, sum_across_processes
from tether.training.fsdp import plain, state_bytes
from tether.training.memory import resident_mb
from tether.training.metrics import MetricsWriter
from tether.training.optim import (apply_peak_lr, check_step_finite, configured_peaks, make_optimizer,
                                   make_scheduler)
from tether.training.progress import Progress
from tether.training.signals import StopRequest

if TYPE_CHECKING:
    from tether.config import TrainConfig

log = logging.getLogger("tether")

LossFn = Callable[[Any, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class LoopSpec:
    """What a recipe hands to `train_supervised`."""

    stage: str
    model: Any
    train_units: Sequence[Any]
    eval_units: Optional[Sequence[Any]]
    collate: Callable[[Sequence[Any]], dict]
    loss_fn: LossFn
    weight_fn: Callable[[dict], float]
    tokens_fn: Callable[[dict], int] = lambda batch: int(batch["attention_mask"].sum())
    eval_hook: Optional[Callable[[Any], dict]] = None  # extra eval metrics (e.g. gold accuracy)
    bar_keys: tuple[str, ...] = ("loss",)


@dataclass
class LoopResult:
    model: Any  # unwrapped, ready to save
    step: int
    final_eval: dict = field(default_factory=dict)
    train_seconds: float = 0.0


def train_supervised(cfg: "TrainConfig", accelerator: Any, spec: LoopSpec) -> LoopResult:
    """Run the loop described in the module docstring; returns the trained (unwrapped) model."""
    out = Path(cfg.output_dir)
    # 1. data order and step budget
    batches = GlobalBatches(len(spec.train_units), cfg.batch_size, cfg.grad_accum,
                            accelerator.num_processes, cfg.seed)
    steps = total_steps(len(spec.train_units), batches, cfg.epochs, cfg.max_steps)
    # 2. optimizer and schedule; the scheduler is checkpointed but not wrapped by accelerate,
    #    because accelerate would step it once per process and tether counts global steps.
    #    Under --fsdp the model is sharded first (training/fsdp.py) and not wrapped by accelerate.
    fsdp = cfg.fsdp
    if fsdp:
        from tether.training.fsdp import place

        place(spec.model, accelerator, True)
    optimizer = make_optimizer(spec.model.parameters(), cfg.lr, cfg.weight_decay, cfg.adam_eps)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_ratio, steps)
    if fsdp:
        model = spec.model
    else:
        model, optimizer = accelerator.prepare(spec.model, optimizer)
    shards = ([model], [optimizer]) if fsdp else None
    # 3. resume
    state = {"best_eval": math.inf, "bad_evals": 0}
    start = 0
    peaks = configured_peaks([optimizer])  # as built from the config, before the state loads
    loaded = load_checkpoint(accelerator, out, [scheduler], shards) if cfg.resume else None
    ckpt = loaded[0] if loaded else None
    if loaded is not None:
        state.update(loaded[1])
        start = state.pop("step")
        apply_peak_lr([scheduler], [optimizer], peaks)
        log.info("resumed from %s at step %d of %d", ckpt, start, steps)
    metrics = MetricsWriter(out, accelerator.is_main_process, cfg.report_to,
                            resume_step=start if ckpt is not None else None,
                            config={"stage": type(cfg).__name__, **to_dict(cfg)}, stage=spec.stage)
    bar = Progress(steps, start, spec.stage, cfg.progress and accelerator.is_main_process)
    evaluate = lambda: _evaluate(accelerator, model, spec, cfg.batch_size, fsdp)  # noqa: E731
    t0, final_eval, step = time.perf_counter(), {}, start
    with StopRequest() as stop, metrics:  # the trackers are finished however the loop ends
        # 4. the loop: one iteration = one optimizer step over one global batch
        for step in range(start + 1, steps + 1):
            t_step = time.perf_counter()
            micro = [spec.collate([spec.train_units[i] for i in idx])
                     for idx in batches.step_indices(step - 1, accelerator.process_index)]
            row = _train_step(accelerator, model, optimizer, micro, spec, cfg.max_grad_norm, step, out)
            row["lr"] = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            row["epoch"] = batches.epoch_of(step)
            row["tokens_per_sec"] = row.pop("tokens") / max(time.perf_counter() - t_step, 1e-9)
            # 5. evaluation and early stopping
            end_of_epoch = step % batches.steps_per_epoch == 0
            if spec.eval_units and ((cfg.eval_every and step % cfg.eval_every == 0)
                                    or (not cfg.eval_every and end_of_epoch) or step == steps):
                final_eval = evaluate()
                row.update(final_eval)
                _track_best(state, final_eval.get("eval/loss", math.inf))
            if step % cfg.log_every == 0 or step == steps or "eval/loss" in row:
                row["rss_mb"], row["state_mb"] = max_across_processes(
                    accelerator, resident_mb(), state_bytes(model, optimizer) / 2**20)
                metrics.log(step, {("train/" + k if "/" not in k else k): v for k, v in row.items()})
            bar.update(1, **{k: row[k] for k in spec.bar_keys if k in row},
                       tok_s=round(row["tokens_per_sec"]))
            stop_early = cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience
            interrupted = any_process(accelerator, stop.requested)
            # 6. atomic checkpoints
            if step % cfg.save_every == 0 or step == steps or interrupted or stop_early:
                save_checkpoint(accelerator, out, step, state, cfg.keep_checkpoints, [scheduler],
                                [accelerator.unwrap_model(model)], shards)
            if interrupted:
                bar.close()
                raise Interrupted(f"stopped at step {step}; checkpoint saved under {out}/checkpoints. "
                                  "Rerun the same command with --resume to continue.")
            if stop_early:
                log.info("early stopping at step %d: eval loss has not improved for %d evaluations",
                         step, state["bad_evals"])
                break
    bar.close()
    if spec.eval_hook is not None:
        final_eval.update(spec.eval_hook(accelerator.unwrap_model(model)))
    return LoopResult(accelerator.unwrap_model(model), step, final_eval, time.perf_counter() - t0)


def _train_step(accelerator: Any, model: Any, optimizer: Any, micro: list[dict], spec: LoopSpec,
                max_grad_norm: float, step: int, out: Path) -> dict:
    """Accumulate gradients over the micro-batches and take one optimizer step, unless the loss
    or the gradient norm is not finite: then no weight changes and the run stops."""
    model.train()
    world = accelerator.num_processes
    global_weight = sum_across_processes(accelerator, sum(spec.weight_fn(b) for b in micro))
    loss_sum, stat_sums, tokens = 0.0, {}, 0
    for i, batch in enumerate(micro):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = accelerator.no_sync(model) if i < len(micro) - 1 else _nullcontext()
        with sync:
            loss, stats = spec.loss_fn(model, batch)
            # DDP averages gradients over processes, so scale by world / global weight
            accelerator.backward(loss * world / max(global_weight, 1e-9))
        loss_sum += loss.detach().float().item()
        tokens += spec.tokens_fn(batch)
        for k, v in stats.items():
            stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
    # the total norm, clipped only when asked (an infinite bound measures without clipping)
    grad_norm = plain(accelerator.clip_grad_norm_(model.parameters(),
                                                  max_grad_norm if max_grad_norm > 0 else math.inf))
    total = sum_across_processes(accelerator, loss_sum) / max(global_weight, 1e-9)
    check_step_finite({"loss": total, "gradient norm": grad_norm}, step, out,
                      lambda: optimizer.zero_grad(set_to_none=True))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row = {"loss": total, "tokens": sum_across_processes(accelerator, tokens)}
    for k, v in stat_sums.items():
        row[k] = sum_across_processes(accelerator, v) / max(global_weight, 1e-9)
    if max_grad_norm > 0:
        row["grad_norm"] = float(grad_norm)
    return row


@torch.no_grad()
def _evaluate(accelerator: Any, model: Any, spec: LoopSpec, batch_size: int, fsdp: bool = False) -> dict:
    """Held-out loss (and stats) over the whole eval set, sharded across processes. Under
    --fsdp every forward is a collective, so a process with fewer batches runs forwards on its
    first batch again, counted for nothing, until every process has run as many."""
    model.eval()
    units = spec.eval_units or []
    mine = list(range(accelerator.process_index, len(units), accelerator.num_processes))
    loss_sum, weight, stat_sums = 0.0, 0.0, {}
    starts = list(range(0, len(mine), batch_size))
    if fsdp:
        most = int(max_across_processes(accelerator, len(starts))[0])
        for _ in range(most - len(starts)):
            spec.loss_fn(model, {k: v.to(accelerator.device) for k, v in
                                 spec.collate([units[i] for i in (mine or [0])[:batch_size]]).items()})
    for at in starts:
        batch = spec.collate([units[i] for i in mine[at:at + batch_size]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, stats = spec.loss_fn(model, batch)
        loss_sum += float(loss)
        weight += spec.weight_fn(batch)
        for k, v in stats.items():
            stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
    weight = sum_across_processes(accelerator, weight)
    out = {"eval/loss": sum_across_processes(accelerator, loss_sum) / max(weight, 1e-9)}
    for k, v in stat_sums.items():
        out["eval/" + k] = sum_across_processes(accelerator, v) / max(weight, 1e-9)
    model.train()
    return out


def _track_best(state: dict, eval_loss: float) -> None:
    if eval_loss < state["best_eval"] - 1e-6:
        state["best_eval"], state["bad_evals"] = eval_loss, 0
    else:
        state["bad_evals"] += 1


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
