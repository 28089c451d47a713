"""The first and last steps of every training recipe: claim the run directory, and publish the
final model with its completion marker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tether.models.save import mark_complete, save_model
from tether.training.fsdp import full_state_dict, is_sharded
from tether.training.launch import make_accelerator
from tether.training.rundir import claim, save_run_config

log = logging.getLogger("tether")


def start_run(cfg: Any) -> tuple[Any, Path]:
    """Step 1 of every training recipe: the Accelerator (seeded), the run directory claimed
    under the rules of `tether.training.rundir` (every check before anything is written) and
    the resolved config written into it."""
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
    state_dict = full_state_dict(model) if is_sharded(model) else None  # every process joins
    if accelerator.is_main_process:
        save_model(model, tokenizer, out, merge_lora=merge_lora, config_updates=config_updates,
                   state_dict=state_dict)
        mark_complete(out, stage, summary)
    accelerator.wait_for_everyone()
    log.info("%s done: %s -> %s", stage, summary, out)
    return summary
