"""Experiment trackers (--report-to): the metrics of metrics.jsonl, under the same names and steps,
through accelerate's own tracker classes (`accelerate.tracking`).

Each tracker writes locally under the run directory unless the user's environment points it
elsewhere, and nothing tries the network unless asked to:

    tensorboard   output_dir/tensorboard (events; the config as hparams under a timestamped subdir)
    wandb         offline, in output_dir/wandb/offline-run-*; WANDB_MODE (online, disabled) and
                  WANDB_DIR, WANDB_PROJECT, WANDB_ENTITY are the user's to set
    mlflow        a sqlite store, output_dir/mlruns/mlflow.db, artifacts in output_dir/mlruns/artifacts,
                  unless MLFLOW_TRACKING_URI is set; MLFLOW_DISABLE_TELEMETRY is set to true unless
                  the user set it
    trackio       output_dir/trackio (its sqlite database per project) unless TRACKIO_DIR is set;
                  local unless TRACKIO_SPACE_ID or TRACKIO_SERVER_URL is set

output_dir/trackers.json records where each one went (directories, tracking URI, run ids) and the
run's log says the same. Only the process that writes metrics.jsonl (the main one) opens trackers.
A value that is not a finite number is left out of the trackers (metrics.jsonl holds null).
A tracker that fails while logging is warned about and left out from then on; metrics.jsonl, the
record of the run, goes on.

On resume the trackers carry on the run they started: W&B with the same run id (resume="allow";
online this is one run, offline each start writes its own offline-run-* directory under that id,
which `wandb sync` puts together), MLflow the same run id in the same store, trackio the same run
name (resume="allow"), TensorBoard a new events file in the same directory. Steps between the last
checkpoint and the stop are logged twice by the trackers that keep every point (MLflow,
TensorBoard, trackio); metrics.jsonl is cut back to the checkpoint and holds them once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from tether.config.groups import TRACKER_INSTALL, tracker_names
from tether.errors import ConfigError

log = logging.getLogger("tether")

INFO_FILE = "trackers.json"
PROJECT = "tether"  # W&B project, MLflow experiment and trackio project unless the user names one
_LOCAL_MLFLOW_URI: Optional[str] = None  # the store under a run directory this process last chose


def params(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as tracker parameters: numbers, strings and booleans as they are, None as None,
    anything else (lists, mappings) as its text."""
    out = {}
    for key, value in config.items():
        out[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return out


def numeric(row: Mapping[str, Any]) -> dict[str, float | int]:
    """The values of a metrics row a tracker takes: finite numbers (booleans as 0/1), not the step."""
    out = {}
    for key, value in row.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        if isinstance(value, bool):
            value = int(value)
        if math.isfinite(value):
            out[key] = value
    return out


def _need(name: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"--report-to {name} needs {module}, which cannot be imported ({err}): "
                          f"{TRACKER_INSTALL[name]}") from None


def mlflow_store(output_dir: Path) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location) for MLflow: the user's MLFLOW_TRACKING_URI (the server
    places artifacts), else a sqlite store in output_dir/mlruns, the default store of MLflow 3 (its
    file store is refused unless MLFLOW_ALLOW_FILE_STORE is set), with artifacts beside it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri != _LOCAL_MLFLOW_URI:  # (mlflow.set_tracking_uri exports what it is given)
        return uri, None
    store = (Path(output_dir) / "mlruns").resolve()
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


class Trackers:
    """The run's open trackers: `log` one row to all of them, `close` them at the end."""

    def __init__(self, report_to: str | tuple[str, ...], output_dir: str | Path,
                 config: Optional[Mapping[str, Any]] = None, stage: str = "", resumed: bool = False):
        names = tracker_names(report_to) if isinstance(report_to, str) else tuple(report_to)
        self.out = Path(output_dir)
        self.open: list[tuple[str, Any]] = []
        self.info: dict[str, dict] = {}
        self._broken: set[str] = set()
        before = self._recorded() if resumed else {}
        if not names:
            if not resumed:  # a fresh run: no record of an earlier one's trackers stays behind
                (self.out / INFO_FILE).unlink(missing_ok=True)
            return
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through it; a no-op inside a training run
        run_params = params(config or {})
        try:
            for name in names:
                tracker = getattr(self, "_make_" + name)(run_params, stage, before.get(name, {}), resumed)
                tracker.start()
                self.open.append((name, tracker))  # from here on close() finishes it
                if name != "trackio":  # trackio took the config at init (_make_trackio)
                    tracker.store_init_configuration(run_params)
                self.info[name] = getattr(self, "_where_" + name)(tracker)
        except BaseException:
            self.close(failed=True)
            raise
        from tether.training.files import atomic_write_json

        # a resumed run keeps the record of trackers it does not use this time
        atomic_write_json(self.out / INFO_FILE, {**before, **self.info})
        for name, info in self.info.items():
            log.info("--report-to %s: %s", name, ", ".join(f"{k} {v}" for k, v in info.items()))

    # ------------------------------------------------------------------ the trackers: each one's
    # accelerate tracker (not started yet), and where it went once started

    def _make_tensorboard(self, run_params: dict, stage: str, before: dict, resumed: bool) -> Any:
        _need("tensorboard", "tensorboard")
        from accelerate.tracking import TensorBoardTracker

        return TensorBoardTracker("tensorboard", self.out)  # output_dir/tensorboard

    def _where_tensorboard(self, tracker: Any) -> dict:
        return {"dir": str(tracker.logging_dir)}

    def _make_wandb(self, run_params: dict, stage: str, before: dict, resumed: bool) -> Any:
        _need("wandb", "wandb")
        from accelerate.tracking import WandBTracker

        kwargs: dict[str, Any] = {"name": self.out.name, "job_type": stage or None}
        if not os.environ.get("WANDB_MODE"):
            kwargs["mode"] = "offline"
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.out)  # wandb adds wandb/ itself
        if resumed and before.get("run_id"):
            kwargs.update(id=before["run_id"], resume="allow")
        return WandBTracker(os.environ.get("WANDB_PROJECT") or PROJECT, **kwargs)

    def _where_wandb(self, tracker: Any) -> dict:
        run = tracker.run
        info = {"mode": run.settings.mode, "project": run.project, "run_id": run.id,
                "dir": run.settings.sync_dir}
        if run.settings.mode == "offline":
            info["upload"] = f"wandb sync {run.settings.sync_dir}"
        return info

    def _make_mlflow(self, run_params: dict, stage: str, before: dict, resumed: bool) -> Any:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline unless the user says
        mlflow = _need("mlflow", "mlflow")
        from accelerate.tracking import MLflowTracker

        global _LOCAL_MLFLOW_URI
        uri, artifacts = mlflow_store(self.out)
        if artifacts is not None:
            (self.out / "mlruns").mkdir(parents=True, exist_ok=True)  # sqlite makes no folder
            _LOCAL_MLFLOW_URI = uri
        mlflow.set_tracking_uri(uri)  # also over a URI an earlier stage of this process set
        run_id = before.get("run_id") if resumed and before.get("tracking_uri") == uri else None
        return MLflowTracker(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT,
                             logging_dir=artifacts, run_id=run_id, run_name=self.out.name,
                             tags={"tether.stage": stage} if stage else None)

    def _where_mlflow(self, tracker: Any) -> dict:
        import mlflow

        return {"tracking_uri": mlflow.get_tracking_uri(), "experiment": tracker.experiment_name,
                "run_id": tracker.active_run.info.run_id}

    def _make_trackio(self, run_params: dict, stage: str, before: dict, resumed: bool) -> Any:
        # trackio reads its folder once, when it is first imported: point it at the run directory
        # then, unless the user chose one (TRACKIO_DIR)
        chosen = os.environ.get("TRACKIO_DIR")
        if "trackio" not in sys.modules and not chosen:
            os.environ["TRACKIO_DIR"] = str(self.out / "trackio")
            try:
                _need("trackio", "trackio")
            finally:
                os.environ.pop("TRACKIO_DIR", None)
        else:
            _need("trackio", "trackio")
        self._trackio_dir = Path(getattr(sys.modules.get("trackio.utils"), "TRACKIO_DIR", chosen or ""))
        if not chosen and self._trackio_dir != self.out / "trackio":
            log.warning("--report-to trackio: trackio was first imported by an earlier run of this "
                        "process, so it writes into %s, not %s", self._trackio_dir, self.out / "trackio")
        from accelerate.tracking import TrackioTracker

        # the config goes in with init: accelerate's store_init_configuration passes trackio a
        # keyword (allow_val_change) that it would keep as one more parameter
        return TrackioTracker(PROJECT, name=self.out.name, group=stage or None, config=run_params,
                              resume="allow" if resumed else "never")

    def _where_trackio(self, tracker: Any) -> dict:
        return {"dir": str(self._trackio_dir), "project": PROJECT, "run": tracker.run.name}

    # ------------------------------------------------------------------ logging and closing

    def _recorded(self) -> dict:
        try:
            return json.loads((self.out / INFO_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        values = numeric(row)
        if not values:
            return
        for name, tracker in self.open:
            if name in self._broken:
                continue
            try:
                tracker.log(values, step=step)
            except Exception as err:  # noqa: BLE001 - metrics.jsonl goes on; the tracker is left out
                self._broken.add(name)
                log.warning("--report-to %s failed at step %d (%s: %s); it gets no more metrics "
                            "this run, metrics.jsonl has them all", name, step, type(err).__name__, err)

    def close(self, failed: bool = False) -> None:
        """Finish every tracker (a failed run is marked so where the tracker knows the word)."""
        while self.open:
            name, tracker = self.open.pop()
            try:
                if failed and name == "wandb":
                    tracker.run.finish(exit_code=1)
                elif failed and name == "mlflow":
                    import mlflow

                    mlflow.end_run(status="FAILED")
                else:
                    tracker.finish()
                if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI") == _LOCAL_MLFLOW_URI:
                    import mlflow

                    mlflow.set_tracking_uri(None)  # the run's own store is not the process's
            except Exception as err:  # noqa: BLE001 - the others still get closed
                log.warning("--report-to %s: closing it failed (%s: %s)", name, type(err).__name__, err)
