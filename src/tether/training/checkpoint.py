"""Atomic checkpoints under output_dir/checkpoints/step-N.

A checkpoint is written into a hidden temp directory and renamed into place only when complete,
so a crash or Ctrl-C mid-write leaves the previous checkpoint intact and no partial one visible.
Model, optimizer, scheduler and RNG states are written by `accelerate` (so DDP/FSDP/DeepSpeed
shard them their own way); tether adds `trainer_state.json` with the step, data position and
any recipe state (KL controller, best eval loss, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from tether.training.files import atomic_write_json, publish_dir

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


class _DropTiedWeightNotice(logging.Filter):
    """accelerate's safetensors writer stores a tied weight (lm_head = embeddings) once and warns
    that a reload may not restore the other name. For a checkpoint that warning never applies:
    `load_state` copies into the same live modules, whose weights are still tied, and the resume
    tests check that a tied model resumes exactly. The notice only alarms users, so it is
    dropped while tether writes a checkpoint, and only then."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tied_weights():
    logger = logging.getLogger("accelerate.utils.other")
    notice = _DropTiedWeightNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, state: dict,
                    keep: int = 2) -> Path:
    """Save everything needed to resume at `step`. All processes must call this."""
    root = checkpoint_root(output_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_tied_weights():
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, {"step": step, **state})
        publish_dir(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path) -> dict:
    """Restore model/optimizer/scheduler/RNG states and return trainer_state.json."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())
