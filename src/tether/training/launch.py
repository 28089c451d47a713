"""Starting a process of a run: tether's logger, the accelerate Accelerator, the checks on how
the run was launched, and the dtype the models run in.

Every loop runs through `accelerate.Accelerator`, so `accelerate launch` gives DDP (and tether's
own FSDP2 with --fsdp) without code of ours. tether drives data order itself (see
`tether.training.batches.GlobalBatches`) so that a run is exactly reproducible and resumable
whatever the number of processes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch

from tether.errors import ConfigError
from tether.training.memory import keep_freed_memory

log = logging.getLogger("tether")


def setup_logging(is_main: bool = True) -> None:
    """tether's messages go to stderr as `[tether] ...`; processes other than the main one
    only warn, so a launch of N processes does not print every line N times."""
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
