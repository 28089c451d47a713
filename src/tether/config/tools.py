"""The configs of the stages that run other stages or read their output: pipelines and reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tether.errors import ConfigError


@dataclass(frozen=True)
class PipelineConfig:
    """Run the stages of a pipeline YAML in order; a rerun skips finished stages."""

    pipeline: str = ""
    """The pipeline YAML file (it may also be given as the first argument: tether run FILE)."""
    dry_run: bool = False
    """Validate every stage's config and print the plan without running anything."""

    def validate(self) -> None:
        if not self.pipeline:
            raise ConfigError("give the pipeline file: tether run PIPELINE.yaml")


@dataclass(frozen=True)
class ReportConfig:
    """Write plots (PNG) and a self-contained report.html into a run directory."""

    run_dir: str = ""
    """The run directory (e.g. the demo's output directory, or one stage's output directory);
    it may also be given as the first argument: tether report RUN_DIR."""

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("give the run directory: tether report RUN_DIR")
        if not Path(self.run_dir).is_dir():
            raise ConfigError(f"{self.run_dir} is not a directory")
