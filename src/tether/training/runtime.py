"""The accelerate runtime shared by every training loop.

Every loop runs through `accelerate.Accelerator`, so `accelerate launch` gives DDP, FSDP or
DeepSpeed without code of ours. tether drives data order itself (see `GlobalBatches`) so that a
run is exactly reproducible and resumable whatever the number of processes.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from tether.errors import ConfigError, TrainingError

log = logging.getLogger("tether")


def setup_logging(is_main: bool = True) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[tether] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def make_accelerator(seed: int) -> Any:
    """Create the Accelerator and seed every RNG (python, numpy, torch, cuda)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_launch()
    try:
        accelerator = Accelerator(cpu=not _has_accelerator_device())
    except (RuntimeError, ValueError) as err:  # a launch whose processes cannot connect
        raise ConfigError(f"accelerate could not set up the processes of this launch: "
                          f"{str(err).splitlines()[0]}. Check the `accelerate launch` options "
                          "(on CPUs: --multi_gpu --num_processes N gives N processes over gloo).") from None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"this process was launched as one of WORLD_SIZE={world} processes, but "
                          "accelerate set it up alone, so every process would write the same "
                          "output directory. On CPUs launch with `accelerate launch --multi_gpu "
                          "--num_processes N`.")
    set_seed(seed)
    setup_logging(accelerator.is_main_process)
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    return accelerator


def check_launch() -> None:
    """Refuse, before anything is written, a launch that tether would not run as asked:

    - accelerate's FSDP plugin (`--use_fsdp`, or an FSDP accelerate config), on any device:
      tether shards with torch FSDP2 itself (`--fsdp`) and does not run models wrapped by
      accelerate's FSDP. Without a GPU it is worse: the processes would not be connected.
    - DeepSpeed (`--use_deepspeed`): it does not run on CPUs here, so tether has never been run
      under it; refused everywhere rather than trusted untested (docs/distributed.md).
    """
    enabled = lambda env: os.environ.get(env, "").lower() in ("1", "true", "yes")  # noqa: E731
    gpu = _has_accelerator_device()
    detached = "" if gpu else (" Without a GPU it would also start processes that are not "
                               "connected, each writing the same output.")
    if enabled("ACCELERATE_USE_FSDP"):
        raise ConfigError("tether shards with torch FSDP2 itself, not through accelerate's FSDP "
                          "plugin (`accelerate launch --use_fsdp` or an FSDP accelerate config)."
                          + detached + " Launch with `accelerate launch --multi_gpu "
                          "--num_processes N` and pass --fsdp to the stage.")
    if enabled("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("DeepSpeed is not supported: it was never run with tether (it does not "
                          "run on CPUs, where tether is tested)." + detached + " To shard the "
                          "models, launch with `accelerate launch --multi_gpu --num_processes N` "
                          "and pass --fsdp (torch FSDP2).")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """On Linux/glibc, keep freed memory in the process instead of handing it back to the OS.

    By default glibc serves every large block (a logits tensor, an activation) with a fresh mmap
    and unmaps it on free, so each training step page-faults its activations in again and the
    kernel zeroes them: thousands of faults per step. A caching allocator (PyTorch's own on a
    GPU, jemalloc or tcmalloc on a CPU) avoids that; this gets the same from glibc itself by
    serving blocks up to 256 MiB from the heap and trimming the heap only past 1 GiB of free top.
    On the PPO benchmark model that is 21,000 page faults and 60 ms of system time per
    iteration, down to 470 faults and 5 ms. The cost: the process keeps its peak memory.
    Set TETHER_CPU_MALLOC=0 to leave glibc's defaults alone. Returns whether it was applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("TETHER_CPU_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, or no libc.so.6)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _MALLOC_TUNED = bool(mallopt(_M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _MALLOC_TUNED


def release_freed_memory() -> bool:
    """On Linux/glibc, hand the heap's free memory back to the OS now (malloc_trim). For a
    one-off drop that `keep_freed_memory` would otherwise keep for good: the whole models each
    process loads before --fsdp shards them. Returns whether it ran."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def _has_accelerator_device() -> bool:
    """accelerate only sets up multi-process CPU training (gloo) when told it is on CPU."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it and float32 elsewhere (CPU bf16 is slow)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class GlobalBatches:
    """Deterministic data order: which example indices each process uses at each step.

    Epoch e visits a permutation seeded by (seed, e). One optimizer step consumes a global batch
    of `micro_batch x grad_accum x world_size` examples; micro-batch m of process p takes the
    slice at (m * world_size + p). The order depends only on the seed, never on the number of
    processes, which makes resume exact and lets 1 process and N processes see the same data.
    """

    num_examples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_examples // self.global_batch)

    def _order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen)

    def step_indices(self, step: int, rank: int) -> list[list[int]]:
        """Index lists of this process's micro-batches for optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = within * self.global_batch
        chunk = order[start:start + self.global_batch]
        if len(chunk) < self.global_batch:  # dataset smaller than one global batch: wrap around
            chunk = order.repeat(math.ceil(self.global_batch / self.num_examples))[:self.global_batch]
        out = []
        for m in range(self.grad_accum):
            at = (m * self.world_size + rank) * self.micro_batch
            out.append(chunk[at:at + self.micro_batch].tolist())
        return out

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def total_steps(num_examples: int, batches: GlobalBatches, epochs: int, max_steps: int) -> int:
    return max_steps if max_steps > 0 else batches.steps_per_epoch * epochs


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
    from tether.training.checkpoint import latest_checkpoint

    last = latest_checkpoint(output_dir)
    advice = (f"The last checkpoint, {last}, is intact and finite: lower --lr and rerun with "
              "--resume." if last else "No checkpoint was written yet: lower --lr and start again.")
    shown = ", ".join(f"{k} {v}" for k, v in bad.items())
    at = f"step {step}" if isinstance(step, int) else step
    raise TrainingError(f"the optimizer step of {at} was not taken: {shown}. No weight was "
                        f"changed. {advice} Also check the data for empty responses, or use "
                        "--dtype float32.")


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


def any_process(accelerator: Any, flag: bool) -> bool:
    """True if `flag` is True on any process (so all processes stop together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def sum_across_processes(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum").item())


def resident_mb() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def max_across_processes(accelerator: Any, *values: float) -> list[float]:
    """Each value's largest across processes, in one collective."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], device=accelerator.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float,
                   eps: float) -> torch.optim.Optimizer:
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
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * steps),
                         num_training_steps=steps)


def start_run(cfg: Any) -> tuple[Any, Path]:
    """Step 1 of every training recipe: the Accelerator (seeded), the run directory claimed
    under the rules of `tether.training.rundir` (every check before anything is written) and
    the resolved config written into it."""
    from tether.training.rundir import claim, save_run_config

    accelerator = make_accelerator(cfg.seed)
    out = claim(cfg, accelerator.is_main_process)
    if accelerator.is_main_process:
        save_run_config(cfg, out)
    accelerator.wait_for_everyone()
    return accelerator, out


def finish_run(accelerator: Any, model: Any, tokenizer: Any, out: Path, stage: str, summary: dict,
               merge_lora: bool = True, config_updates: dict | None = None) -> dict:
    """The last step of every supervised recipe: the main process saves the final model into
    the run directory and then the completion marker; every process waits for it."""
    from tether.models.save import mark_complete, save_model
    from tether.training.fsdp import full_state_dict, is_sharded

    state_dict = full_state_dict(model) if is_sharded(model) else None  # every process joins
    if accelerator.is_main_process:
        save_model(model, tokenizer, out, merge_lora=merge_lora, config_updates=config_updates,
                   state_dict=state_dict)
        mark_complete(out, stage, summary)
    accelerator.wait_for_everyone()
    log.info("%s done: %s -> %s", stage, summary, out)
    return summary
