"""Metric sinks: output_dir/metrics.jsonl (one JSON object per logged step) and the experiment
trackers of --report-to (TensorBoard, W&B, trackio, MLflow: `tether.training.trackers`), which get
every row under the same names at the same step.

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
    """Append metrics rows and send them to the trackers; only the main process writes.

    report_to: the trackers (a --report-to value, or a tuple of names; "none" for none, which
    also drops an earlier run's trackers.json unless resuming; None for a side file such as
    samples.jsonl, which has nothing to do with the trackers). config: the run's config as
    config.yaml holds it, logged as the trackers' run parameters. stage: the stage's name (sft,
    grpo, ...), a tag of the trackers' runs. Use it as a context manager, or call close(): the
    trackers are finished there (marked failed when the run raised).
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True,
                 report_to: str | tuple[str, ...] | None = "tensorboard",
                 resume_step: Optional[int] = None, filename: str = "metrics.jsonl",
                 config: Optional[Mapping[str, Any]] = None, stage: str = ""):
        self.path = Path(output_dir) / filename
        self.enabled = enabled
        self.trackers = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        if report_to is None:
            return
        from tether.training.trackers import Trackers

        self.trackers = Trackers(report_to, output_dir, config, stage, resumed=resume_step is not None)

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
        if self.trackers is not None:
            self.trackers.log(step, row)  # null (non-finite) values are left out there
        return row

    def close(self, failed: bool = False) -> None:
        """Finish the trackers; a second call does nothing."""
        if self.trackers is not None:
            self.trackers.close(failed=failed)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(failed=exc_type is not None)


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl back into a list of rows."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
