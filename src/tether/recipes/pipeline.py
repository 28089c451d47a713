"""`tether run PIPELINE.yaml`: chain stages, each one's output feeding the next.

A pipeline file:

    output_dir: runs/my-pipeline      # stage outputs default to <output_dir>/<name>
    stages:
      - name: sft
        stage: sft
        model: path/to/base
        data: sft.jsonl
      - name: rm
        stage: rm
        model: ${sft}                 # ${name} is the output directory of an earlier stage
        data: pairs.jsonl
      - name: ppo
        stage: ppo
        policy: ${sft}
        reward_model: ${rm}
        prompts: prompts.jsonl

Every stage's config is built and validated before any work starts. On a rerun, a stage whose
output is complete (`tether_run.json`) is skipped, and an unfinished one resumes from its last
checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.config import PipelineConfig, from_dict, normalise_key, read_yaml
from tether.errors import ConfigError
from tether.stages import STAGES, config_class, run_stage
from tether.training.rundir import prepare_rerun

log = logging.getLogger("tether")
_REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)\}")


@dataclass(frozen=True)
class PlannedStage:
    name: str
    stage: str
    config: Any


def plan(path: str) -> list[PlannedStage]:
    """Parse and validate the whole pipeline; raises ConfigError naming the bad stage."""
    spec = read_yaml(path)
    unknown = set(spec) - {"output_dir", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; use output_dir and stages")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    root = Path(spec.get("output_dir") or Path(path).with_suffix(""))
    outputs: dict[str, str] = {}
    planned = []
    for i, raw in enumerate(stages, start=1):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: stage {i} must be a mapping")
        raw = {normalise_key(k): v for k, v in raw.items()}
        name, stage = str(raw.pop("name", "") or raw.get("stage", "")), raw.pop("stage", None)
        where = f"{path}: stage {i} ({name or '?'})"
        if stage not in STAGES or stage in {"run", "demo"}:
            allowed = ", ".join(s for s in STAGES if s not in {"run", "demo"})
            raise ConfigError(f"{where}: unknown stage {stage!r}; choose one of {allowed}")
        if name in outputs:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        values = {k: _substitute(v, outputs, where) for k, v in raw.items()}
        values.setdefault("output_dir", str(root / name))
        try:
            cfg = from_dict(config_class(stage), values)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        outputs[name] = str(values["output_dir"])
        planned.append(PlannedStage(name, stage, cfg))
    return planned


def _substitute(value: Any, outputs: dict[str, str], where: str) -> Any:
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        ref = match.group(1)
        if ref not in outputs:
            raise ConfigError(f"{where}: ${{{ref}}} does not name an earlier stage "
                              f"(earlier stages: {', '.join(outputs) or 'none'})")
        return outputs[ref]

    return _REF.sub(sub, value)


def run(cfg: PipelineConfig) -> list[dict]:
    """Run every planned stage in order, skipping finished ones and resuming unfinished ones
    (the rerun rule of `tether.training.rundir.skip_or_resume`)."""
    from tether.training.launch import setup_logging  # torch: not imported for `tether run --help`

    setup_logging()
    stages = plan(cfg.pipeline)
    report = []
    for planned in stages:
        out = getattr(planned.config, "output_dir", "")
        action, config = prepare_rerun(planned.config)
        if action == "skip":
            log.info("pipeline: %s is complete in %s, skipping", planned.name, out)
            report.append({"name": planned.name, "status": "skipped", "output_dir": out})
            continue
        if action == "resume":
            log.info("pipeline: %s has checkpoints in %s, resuming", planned.name, out)
        if cfg.dry_run:
            report.append({"name": planned.name, "status": "planned", "output_dir": out})
            continue
        log.info("pipeline: running %s (%s) -> %s", planned.name, planned.stage, out)
        run_stage(planned.stage, config)
        report.append({"name": planned.name, "status": "ran", "output_dir": out})
    for row in report:
        print(f"{row['name']:>12}  {row['status']:<8}  {row['output_dir']}")
    return report
