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

from tether.training.checkpoint import require_finite_weights
from tether.training.files import atomic_write_json, move_files_into

COMPLETE_MARKER = "tether_run.json"


def save_model(model: Any, tokenizer: Any, output_dir: str | Path, merge_lora: bool = True,
               config_updates: Optional[dict] = None, state_dict: Optional[dict] = None) -> Path:
    """Write weights (safetensors), config and tokenizer into `output_dir`.

    A peft model is merged into full weights first when `merge_lora` (otherwise the adapter is
    saved). `config_updates` are set on `model.config` before saving (e.g. a reward bias).
    Weights that are not finite are refused before anything is written. `state_dict`: the
    weights to write instead of the model's own (an --fsdp model's, gathered).
    """
    out = Path(output_dir)
    if state_dict is None:
        require_finite_weights(model, f"the model into {out}", out)
    else:  # a sharded model's gathered weights (training/fsdp.py: full_state_dict)
        import torch

        bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            from tether.errors import TrainingError

            raise TrainingError(f"not writing the model into {out}: {len(bad)} tensor(s) hold NaN or inf "
                                f"(e.g. {bad[0]}). Lower --lr and rerun with --resume.")
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config") and merge_lora:
        model = model.merge_and_unload()
    for key, value in (config_updates or {}).items():
        setattr(model.config, key, value)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # what inference users expect from a saved model
    model.save_pretrained(tmp, safe_serialization=True,
                          **({"state_dict": state_dict} if state_dict is not None else {}))
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
