"""Save final models as standard Hugging Face directories, atomically.

The run's output directory itself is the final model: `from_pretrained(output_dir)` just works.
Files are written to a hidden temp directory first and renamed into place, then a
`tether_run.json` marker is written last; a directory without the marker is not complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from tether.training.files import atomic_write_json, move_files_into

COMPLETE_MARKER = "tether_run.json"


def save_model(model: Any, tokenizer: Any, output_dir: str | Path, merge_lora: bool = True,
               config_updates: Optional[dict] = None) -> Path:
    """Write weights (safetensors), config and tokenizer into `output_dir`.

    A peft model is merged into full weights first when `merge_lora` (otherwise the adapter is
    saved). `config_updates` are set on `model.config` before saving (e.g. a reward bias).
    Weights that are not finite are refused before anything is written.
    """
    from tether.training.checkpoint import require_finite_weights

    out = Path(output_dir)
    require_finite_weights(model, f"the model into {out}", out)
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config") and merge_lora:
        model = model.merge_and_unload()
    for key, value in (config_updates or {}).items():
        setattr(model.config, key, value)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # what inference users expect from a saved model
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    move_files_into(tmp, out)
    return out


def mark_complete(output_dir: str | Path, stage: str, summary: dict) -> None:
    """Write the completion marker that `tether run` uses to skip finished stages."""
    atomic_write_json(Path(output_dir) / COMPLETE_MARKER, {"stage": stage, "complete": True, **summary})


def is_complete(output_dir: str | Path) -> bool:
    path = Path(output_dir) / COMPLETE_MARKER
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False
