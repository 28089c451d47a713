"""Metric sinks: output_dir/metrics.jsonl (one JSON object per logged step) and TensorBoard.

Names are fixed per stage and documented in docs/metrics.md. On resume, lines past the resumed
step are dropped so that the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger("tether")


def _plain(value: Any) -> Any:
    """A JSON value: NaN and +-inf, which JSON has no words for, become null (the row's other
    values still plot)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Append metrics rows; only the main process writes."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None, filename: str = "metrics.jsonl"):
        self.path = Path(output_dir) / filename
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but stay usable without it
                self._tb = None

    def _truncate(self, resume_step: Optional[int]) -> None:
        if not self.path.exists():
            return
        if resume_step is None:
            self.path.unlink()
            return
        keep = []
        lines = self.path.read_text().splitlines()
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write: dropped
                log.warning("%s:%d is not a complete JSON line (a run killed mid-write); dropped",
                            self.path, n)
                continue
            if row.get("step", 0) <= resume_step:
                keep.append(line)
        from tether.training.files import atomic_write_text

        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl back into a list of rows."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
