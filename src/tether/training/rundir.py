"""Claiming a run directory: every check before the first byte is written.

The rules, in the order they are checked:
- `--output-dir` must not be a file, and must not be (or lie inside) any input of the stage: a
  model, data or reward-model directory given on the command line. This holds even with
  --overwrite: it would destroy the input the run reads.
- A directory that holds checkpoints is continued with --resume, or replaced with --overwrite;
  otherwise it is refused.
- A directory that holds a finished run (`tether_run.json`) or a model (weights or config.json)
  is written only with --overwrite, which first removes the old completion marker and
  checkpoints, so nothing stale survives.
- --resume into a directory with nothing to resume says so, and starts from the beginning.
- On resume, the new config is compared with the saved config.yaml: the changes listed in
  `RESUMABLE` are applied and logged, any other is refused with the list of differences. Every
  config a directory ran with is kept (config.yaml is the latest, config-history/ the ones
  before).
- The directory must be writable; the check writes and removes a probe file.

A stage that fails before it has written anything but its config (bad data, a missing model)
leaves no directory behind: `abandon_failed_starts` removes the directories this process
created, when they hold nothing else.

What runs that chain stages (`tether run`, `tether demo`, `tether iterate`) do with a stage's
directory on a rerun follows one rule, `skip_or_resume`: a finished run is skipped, an
unfinished one with checkpoints is resumed, anything else starts (`prepare_rerun` applies it to
a stage's config).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tether.errors import ConfigError
from tether.models.save import is_complete
from tether.training.checkpoint import checkpoint_root, latest_checkpoint, list_checkpoints

log = logging.getLogger("tether")

# Changes that may be made on --resume, and what each means (the README lists them too).
RESUMABLE = {
    "max_steps": "the run stops at the new step count; a decaying schedule is stretched to it",
    "lr": "the new peak learning rate, the schedule carrying on from the step reached",
    "value_lr": "the critic's new peak learning rate, as --lr",
    "save_every": "checkpoint frequency",
    "keep_checkpoints": "how many checkpoints are kept",
    "rounds": "tether iterate runs the rounds it has not run yet",
    "log_every": "logging",
    "progress": "logging",
    "report_to": "logging: the trackers named go on from here (docs/metrics.md, Trackers)",
    "tensorboard": "logging (the older switch for --report-to tensorboard)",
    "resume": "",
    "overwrite": "",
}
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "adapter_config.json", "adapter_model.safetensors")
MARKER = "tether_run.json"
HISTORY = "config-history"

_created: list[Path] = []  # directories this process created, for abandon_failed_starts


def _is_input(name: str) -> bool:
    return name in ("model", "policy", "reference", "data", "prompts", "input") or \
        name.endswith(("_model", "_data", "_prompts"))


def input_paths(cfg: Any) -> dict[str, Path]:
    """The stage's inputs (--model, --policy, --data, --prompts, --reward-model, --eval-data, ...)
    that name an existing local file or directory, by option name."""
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _is_input(f.name) or not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        try:
            if path.exists():
                found[f.name] = path
        except OSError:
            continue
    return found


def _holds_model(out: Path) -> bool:
    return any((out / name).exists() for name in MODEL_FILES)


def claim(cfg: Any, is_main: bool = True) -> Path:
    """Check `cfg.output_dir` against the rules of the module docstring and create it. Nothing
    is written before every check has passed. Returns the directory."""
    out = Path(cfg.output_dir).expanduser()
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory: choose another path")
    target = out.resolve()
    for name, path in input_paths(cfg).items():
        source = path.resolve()
        if target == source or (source.is_dir() and source in target.parents):
            where = "is" if target == source else "lies inside"
            raise ConfigError(f"--output-dir {out} {where} the input {flag(name)} {path}: the run "
                              "would overwrite what it reads. Choose another --output-dir.")
    resume, overwrite = bool(getattr(cfg, "resume", False)), bool(getattr(cfg, "overwrite", False))
    checkpoints = list_checkpoints(out) if out.is_dir() else []
    finished, model = (out / MARKER).exists(), out.is_dir() and _holds_model(out)
    if not overwrite:
        if finished:
            raise ConfigError(f"{out} holds a finished run ({MARKER}); nothing to resume. Pass "
                              "--overwrite to run it again from the start, or choose another "
                              "--output-dir.")
        if checkpoints and not resume:
            raise ConfigError(f"{out} already holds checkpoints from an earlier run. Pass --resume "
                              "to continue it, --overwrite to start again, or choose another "
                              "--output-dir.")
        if model and not checkpoints:
            raise ConfigError(f"{out} holds a model; writing a run there would replace it. Pass "
                              "--overwrite if that is what you want, or choose another --output-dir.")
    if resume and not overwrite and not checkpoints:
        log.warning("--resume: %s holds no checkpoint to resume from; starting from the beginning", out)
    if resume and checkpoints and not overwrite:
        _compare_with_saved(cfg, out)
    if not is_main:
        return out
    _check_writable(out)
    if overwrite:  # nothing of the old run may pass for part of the new one
        (out / MARKER).unlink(missing_ok=True)
        shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    return out


def _check_writable(out: Path) -> None:
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tether-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to --output-dir {out}: {err.strerror or err}. Choose a "
                          "writable directory.") from None
    if not existed:
        _created.append(out)


def _compare_with_saved(cfg: Any, out: Path) -> None:
    """Refuse a resume whose config differs from the saved one in anything but RESUMABLE."""
    import yaml

    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_path} cannot be read ({err}); it records what the run was "
                          "started with, so --resume cannot check the new options against it") from None
    saved.pop("stage", None)
    now = dataclasses.asdict(cfg)
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
               if k not in ("output_dir",) and saved.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if refused:
        lines = "\n".join(f"  --{k.replace('_', '-')}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"--resume: these options differ from the run in {out} ({saved_path}):\n"
                          f"{lines}\nA resumed run must read the same data with the same settings. "
                          f"Only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE if RESUMABLE[k])} "
                          "may change. Start a new --output-dir for the others.")
    for key, (old, new) in changed.items():
        if RESUMABLE.get(key):
            log.info("--resume: --%s %r -> %r (%s)", key.replace("_", "-"), old, new, RESUMABLE[key])


def save_run_config(cfg: Any, out: Path) -> None:
    """Write config.yaml; the one it replaces (a resumed run's earlier config) moves to
    config-history/config-N.yaml, so every config the directory ran with is kept."""
    from tether.config import save_config

    current = out / "config.yaml"
    if current.is_file():
        history = out / HISTORY
        history.mkdir(exist_ok=True)
        n = len(list(history.glob("config-*.yaml"))) + 1
        os.replace(current, history / f"config-{n}.yaml")
    save_config(cfg, out)


def abandon_failed_starts() -> None:
    """Remove the directories this process created that hold nothing but their config (a stage
    that failed before its first output): a failed start leaves nothing behind."""
    keep = {"config.yaml"}
    while _created:
        out = _created.pop()
        try:
            entries = list(out.iterdir())
        except OSError:
            continue
        if all(e.name in keep or (e.is_dir() and not any(e.rglob("*"))) for e in entries):
            shutil.rmtree(out, ignore_errors=True)


def skip_or_resume(output_dir: str | Path) -> str:
    """What a rerun does with a stage's output directory, the one rule of every run that chains
    stages: "skip" when it holds a finished run (its completion marker), "resume" when it holds
    checkpoints of an unfinished one, "start" otherwise (nothing there, or no checkpoint yet)."""
    if is_complete(output_dir):
        return "skip"
    if latest_checkpoint(output_dir) is not None:
        return "resume"
    return "start"


def prepare_rerun(cfg: Any) -> tuple[str, Any]:
    """`skip_or_resume` applied to a stage's config: (action, the config to run it with). On
    "resume" the config gets resume=True, so the run continues from its last checkpoint instead
    of being refused for holding one. A config without an output_dir always starts."""
    out = getattr(cfg, "output_dir", "")
    action = skip_or_resume(out) if out else "start"
    if action == "resume" and not hasattr(cfg, "resume"):
        action = "start"  # a stage without a resume option runs as it is
    if action == "resume":
        cfg = dataclasses.replace(cfg, resume=True)
    return action, cfg
