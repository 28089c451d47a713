"""Atomic checkpoints under output_dir/checkpoints/step-N.

A checkpoint is written into a hidden temp directory and renamed into place only when complete,
so a crash or Ctrl-C mid-write leaves the previous checkpoint intact and no partial one visible.
Model, optimizer and RNG states are written by `accelerate`, or under --fsdp by each process
for its own shards (training/fsdp.py); tether adds `trainer_state.json` with the step, data
position, the LR schedulers' state and any recipe state (KL controller, best eval loss, ...).

Nothing in a checkpoint can run code when it is loaded: the weights are safetensors, the
optimizer and RNG files are read with `torch.load(weights_only=True)` (plain tensors and numpy
arrays only), and the schedulers live in the JSON file instead of accelerate's custom-object
pickles (which it loads with weights_only=False). A checkpoint that cannot be read that way,
or at all (truncated, a disk that filled up), is skipped with a warning for the one before it.
No checkpoint is written from weights that are not finite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from tether.errors import TrainingError
from tether.training.files import atomic_write_json, publish_dir

log = logging.getLogger("tether")

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
                    keep: int = 2, schedulers: Sequence[Any] = (), models: Sequence[Any] = (),
                    shards: Optional[tuple[list[Any], list[Any]]] = None) -> Path:
    """Save everything needed to resume at `step`. All processes must call this. `models`:
    the trained modules, refused if any weight is not finite (nothing is written then).
    `shards`: (models, optimizers) of an --fsdp run, whose states each process writes itself
    (training/fsdp.py) instead of accelerate."""
    for model in models:
        require_finite_weights(model, f"the checkpoint at step {step}", output_dir)
    root = checkpoint_root(output_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if shards is not None:
            from tether.training.fsdp import save_shards

            save_shards(tmp, shards[0], shards[1], accelerator.process_index, accelerator.num_processes)
        else:
            with _quiet_tied_weights():
                accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(tmp / STATE_FILE, {"step": step, **state,
                                                 "schedulers": [s.state_dict() for s in schedulers]})
            publish_dir(tmp, final)
    except (OSError, RuntimeError) as err:  # a full disk, a lost mount (torch raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
        raise TrainingError(f"could not write the checkpoint of step {step} under {root}: "
                            f"{str(err).splitlines()[0]}; {kept}. Free space (or fix the "
                            "directory) and rerun with --resume.") from None
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        clean_partial(output_dir)  # what a killed run left half-written
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, output_dir: str | Path, schedulers: Sequence[Any] = (),
                    shards: Optional[tuple[list[Any], list[Any]]] = None) -> Optional[tuple[Path, dict]]:
    """Restore model/optimizer/RNG/scheduler states from the newest readable checkpoint of
    output_dir and return (its path, its trainer_state.json); None when there is none.

    A checkpoint that cannot be loaded (see the module docstring) is skipped with a warning and
    the one before it is tried; when none can be, the error lists why."""
    found = list_checkpoints(output_dir)
    problems = []
    for path in reversed(found):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            saved = state.pop("schedulers", None)
            if schedulers and saved is None:
                raise ValueError("it holds no scheduler state in trainer_state.json (an older "
                                 "tether kept it in a pickle, which is not loaded)")
            if shards is not None:
                from tether.training.fsdp import load_shards

                load_shards(path, shards[0], shards[1], accelerator.process_index, accelerator.num_processes)
            else:
                accelerator.load_state(str(path), load_kwargs={"weights_only": True})
            for scheduler, saved_state in zip(schedulers, saved or []):
                scheduler.load_state_dict(saved_state)
            return path, state
        except Exception as err:  # unreadable, truncated, or not plain tensors: never unpickled
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            problems.append(f"{path}: {reason}")
            log.warning("checkpoint %s cannot be loaded (%s); trying the one before it", path, reason)
    if problems:
        raise TrainingError("no checkpoint under " f"{checkpoint_root(output_dir)} can be loaded:\n  "
                            + "\n  ".join(problems) + "\nRemove the unreadable ones, or start again "
                            "without --resume in a new --output-dir.")
    return None


def require_finite_weights(model: Any, what: str, output_dir: str | Path) -> None:
    """Raise TrainingError (naming the last checkpoint, which is finite) when any parameter of
    `model` holds a NaN or inf: such weights are never written."""
    import torch

    from tether.training.fsdp import count_nonfinite, is_sharded

    with torch.no_grad():
        if is_sharded(model):  # each process checks its shards; every process learns the result
            bad = count_nonfinite(model)
        else:
            bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        last = latest_checkpoint(output_dir)
        where = f"the last checkpoint, {last}, is finite" if last else "no checkpoint was written"
        raise TrainingError(f"not writing {what}: {len(bad)} parameter tensor(s) hold NaN or inf "
                            f"(e.g. {bad[0]}). {where}. Lower --lr and rerun with --resume.")


def clean_partial(output_dir: str | Path) -> None:
    """Remove checkpoint directories that a killed run left half-written (.tmp-step-N)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for tmp in root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for trash in root.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
