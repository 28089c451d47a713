"""--report-to: every metric of metrics.jsonl reaches each tracker under the same name at the same
step, read back with the tracker's own reader (TensorBoard's event accumulator, W&B's offline
run file, MLflow's client, trackio's store); the config is the run's parameters; everything stays
local. The runs are shared between the checks (module fixtures): W&B and MLflow take seconds to
start. A tracker whose library is absent skips, saying so."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import yaml

from tether.cli import main
from tether.training.metrics import MetricsWriter, read_metrics

from conftest import VOWELS_REWARD, story_rows, write_jsonl

OPTIONAL = [name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]


def need(name: str) -> None:
    if name not in OPTIONAL:
        pytest.skip(f"{name} is not installed (pip install 'tether[trackers]')")


@pytest.fixture(scope="module", autouse=True)
def local_only(tmp_path_factory):
    """No tracker may reach the network or the user's home: W&B's own default would be online,
    so its server is a closed port on this machine, and every home folder is a temporary one."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_API_KEY",
                    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS",
                    "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(home))
        mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
        mp.setenv("XDG_CONFIG_HOME", str(home / ".config"))
        for var, sub in (("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                         ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
            mp.setenv(var, str(home / sub))
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # closed: an online attempt fails here
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield home


# ----------------------------------------------------------------------------- readers


def expected_points(rows: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {name: {step: value}}: the numbers a tracker must hold (null is skipped)."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, {})[row["step"]] = float(value)
    return out


def assert_same(got: dict[str, dict[int, float]], rows: list[dict], rel: float) -> None:
    want = expected_points(rows)
    assert sorted(got) == sorted(want)
    for key, points in want.items():
        assert sorted(got[key]) == sorted(points), key
        for step, value in points.items():
            assert got[key][step] == pytest.approx(value, rel=rel, abs=1e-12), (key, step)


def tensorboard_points(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path):
    """The protobuf records of an offline run's .wandb file: W&B's append-only log (blocks of
    32 KiB, records cut into chunks with a 7-byte header: CRC-32 of type and data, length, type),
    after a 7-byte file header (":W&B", magic, version)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    if len(data) < 7:  # not even the file header yet
        return
    assert data[:4] == b":W&B"
    pos, whole = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zeros: the rest of the block is padding
            pos += left
            continue
        body = data[pos + 7:pos + 7 + length]
        if len(body) < length:  # the writer has not got this far yet
            return
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad chunk at {pos}"
        pos += 7 + length
        whole = body if kind in (1, 2) else whole + body  # full/first start a record
        if kind in (1, 4):  # full/last end it
            record = pb.Record()
            record.ParseFromString(whole)
            yield record


def wandb_run(run_dir: Path) -> tuple[dict, dict, str]:
    """(points, config, exit code) of the run's offline W&B record. W&B's service writes the
    file on its own time (run.finish() may return first): read it once its exit record is in."""
    info = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    files = list(Path(info["dir"]).glob("run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[0])):
        assert time.monotonic() < deadline, f"{files[0]} has no exit record after 60 s"
        time.sleep(0.1)
    points: dict[str, dict[int, float]] = {}
    config: dict = {}
    exit_code = None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            item = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            for key, value in item.items():
                if not key.startswith("_"):
                    points.setdefault(key, {})[item["_step"]] = value
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates if not u.key.startswith("_")})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return points, config, exit_code


def mlflow_run(run_dir: Path):
    """(points, run) read back with MLflow's client from the store trackers.json names."""
    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    points = {key: {m.step: m.value for m in client.get_metric_history(info["run_id"], key)}
              for key in run.data.metrics}
    return points, run


def tracker_params(config: dict) -> dict:
    from tether.training.trackers import params

    return params(config)


# ----------------------------------------------------------------------------- a real stage


@pytest.fixture(scope="module")
def sft_run(tiny_models, tmp_path_factory):
    """`tether sft` on a tiny model, reporting to every installed tracker."""
    root = tmp_path_factory.mktemp("trackers_sft")
    data = write_jsonl(root / "sft.jsonl", story_rows(24))
    out = root / "run"
    report_to = ",".join(["tensorboard", *OPTIONAL])
    assert main(["sft", "--model", str(tiny_models["llama"]), "--data", str(data), "--output-dir", str(out),
                 "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0.25",
                 "--eval-every", "2", "--no-progress", "--report-to", report_to]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval/loss" in rows[1]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["report_to"] == report_to and config["tensorboard"] is None
    return out, rows, config


def test_tensorboard_gets_every_metric_of_a_real_run(sft_run):
    out, rows, config = sft_run
    assert_same(tensorboard_points(out), rows, rel=1e-6)  # float32 events
    (hparams,) = (out / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == tracker_params(config)


def test_wandb_gets_every_metric_of_a_real_run_offline(sft_run):
    need("wandb")
    out, rows, config = sft_run
    info = json.loads((out / "trackers.json").read_text())["wandb"]
    assert info["mode"] == "offline" and Path(info["dir"]).parent == out / "wandb"
    assert info["upload"] == f"wandb sync {info['dir']}"
    points, logged_config, exit_code = wandb_run(out)
    assert_same(points, rows, rel=1e-12)
    assert logged_config == tracker_params(config) and logged_config["stage"] == "SFTConfig"
    assert exit_code == 0


def test_mlflow_gets_every_metric_of_a_real_run_in_a_local_store(sft_run):
    need("mlflow")
    out, rows, config = sft_run
    info = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert info["tracking_uri"] == f"sqlite:///{out.resolve() / 'mlruns' / 'mlflow.db'}"
    points, run = mlflow_run(out)
    assert_same(points, rows, rel=1e-12)
    assert run.data.params == {k: str(v) for k, v in tracker_params(config).items()}
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert run.data.tags["tether.stage"] == "sft"


def test_trackio_gets_every_metric_of_a_real_run_locally(sft_run):
    need("trackio")
    out, rows, config = sft_run
    info = json.loads((out / "trackers.json").read_text())["trackio"]
    assert Path(info["dir"]) == out / "trackio" and (out / "trackio" / "tether.db").is_file()
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    points: dict[str, dict[int, float]] = {}
    for entry in SQLiteStorage.get_logs(info["project"], info["run"]):
        for key, value in entry.items():
            if key not in ("step", "timestamp"):
                points.setdefault(key, {})[entry["step"]] = value
    assert_same(points, rows, rel=1e-12)
    (run,) = [r for r in trackio.Api().runs(info["project"]) if r.name == info["run"]]
    assert {k: v for k, v in run.config.items() if not k.startswith("_")} == tracker_params(config)


@pytest.fixture(scope="module")
def grpo_run(tiny_models, tmp_path_factory, one_torch_thread):
    """`tether grpo` (the online loop) on a tiny model, reporting to every installed tracker."""
    root = tmp_path_factory.mktemp("trackers_grpo")
    (root / "rewards.py").write_text(VOWELS_REWARD)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Once upon a time, {n} saw a"}
                                                    for n in ["Lily", "Tom", "Sue", "Ben"] * 2])
    out = root / "run"
    assert main(["grpo", "--policy", str(tiny_models["llama"]), "--prompts", str(prompts),
                 "--output-dir", str(out), "--reward-fn", f"{root / 'rewards.py'}:vowels",
                 "--batch-size", "4", "--num-generations", "4", "--response-length", "4",
                 "--max-steps", "2", "--no-progress",
                 "--report-to", ",".join(["tensorboard", *OPTIONAL])]) == 0
    return out, read_metrics(out / "metrics.jsonl"), yaml.safe_load((out / "config.yaml").read_text())


def test_every_tracker_gets_every_metric_of_an_online_run(grpo_run):
    out, rows, config = grpo_run
    assert len(rows) == 2 and "objective/rm_score" in rows[0] and "reward_fn/vowels/mean" in rows[0]
    assert_same(tensorboard_points(out), rows, rel=1e-6)
    if "wandb" in OPTIONAL:
        points, logged_config, exit_code = wandb_run(out)
        assert_same(points, rows, rel=1e-12)
        assert logged_config == tracker_params(config) and exit_code == 0
    if "mlflow" in OPTIONAL:
        points, run = mlflow_run(out)
        assert_same(points, rows, rel=1e-12)
        assert run.data.tags["tether.stage"] == "grpo" and run.info.status == "FINISHED"


def test_the_run_says_where_its_trackers_wrote(sft_run):
    out, _, _ = sft_run
    info = json.loads((out / "trackers.json").read_text())
    assert sorted(info) == sorted(["tensorboard", *OPTIONAL])
    assert info["tensorboard"] == {"dir": str(out / "tensorboard")}


# ----------------------------------------------------------------------------- the writer itself


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One MLflow store for the writer's checks (a new sqlite store takes seconds to create);
    the real run above checks the default, a store of its own under output_dir/mlruns."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'shared.db'}"


@pytest.fixture
def user_store(shared_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    return shared_store


def test_non_finite_values_are_null_in_the_file_and_absent_from_the_trackers(tmp_path, user_store):
    report_to = ",".join(["tensorboard", *[n for n in OPTIONAL if n != "trackio"]])
    with MetricsWriter(tmp_path, report_to=report_to, config={"stage": "test", "lr": 0.5}) as writer:
        writer.log(1, {"a": 1.0, "b": float("nan"), "c": float("inf"), "flag": True})
        writer.log(2, {"a": 0.5, "b": 2.0, "c": -float("inf"), "flag": False})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "a": 1.0, "b": None, "c": None, "flag": True},
                    {"step": 2, "a": 0.5, "b": 2.0, "c": None, "flag": False}]
    want = {"a": {1: 1.0, 2: 0.5}, "b": {2: 2.0}, "flag": {1: 1.0, 2: 0.0}}
    assert tensorboard_points(tmp_path) == want
    if "wandb" in OPTIONAL:
        assert wandb_run(tmp_path)[0] == want
    if "mlflow" in OPTIONAL:
        assert mlflow_run(tmp_path)[0] == want


def test_only_the_main_process_opens_trackers(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False, report_to="tensorboard," + ",".join(OPTIONAL))
    writer.log(1, {"a": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_run_without_trackers_drops_an_earlier_runs_record(tmp_path):
    (tmp_path / "trackers.json").write_text("{}")
    MetricsWriter(tmp_path, report_to=None, filename="samples.jsonl").close()  # a side file
    assert (tmp_path / "trackers.json").exists()
    MetricsWriter(tmp_path, report_to="none", resume_step=3).close()  # a resume keeps it
    assert (tmp_path / "trackers.json").exists()
    MetricsWriter(tmp_path, report_to="none").close()
    assert not (tmp_path / "trackers.json").exists()


def test_a_failed_run_closes_its_trackers_marked_failed(tmp_path, user_store):
    need("mlflow")
    with pytest.raises(RuntimeError, match="boom"), MetricsWriter(tmp_path, report_to="mlflow") as writer:
        writer.log(1, {"a": 1.0})
        raise RuntimeError("boom")
    points, run = mlflow_run(tmp_path)
    assert points == {"a": {1: 1.0}} and run.info.status == "FAILED"
    import mlflow

    assert mlflow.active_run() is None


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_file_goes_on(tmp_path, caplog):
    writer = MetricsWriter(tmp_path, report_to="tensorboard")
    ((_, tracker),) = writer.trackers.open

    def broken(values, step=None):
        raise OSError("disk full")

    tracker.log = broken
    writer.log(1, {"a": 1.0})
    writer.log(2, {"a": 2.0})
    writer.close()
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0]
    warnings = [r.getMessage() for r in caplog.records if "--report-to tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0]


def test_a_resumed_run_carries_on_the_same_tracker_runs(tmp_path, user_store):
    names = [n for n in OPTIONAL if n != "trackio"]
    if not names:
        pytest.skip("neither wandb nor mlflow is installed")
    report_to = ",".join(names)
    with MetricsWriter(tmp_path, report_to=report_to) as writer:
        for step in (1, 2, 3):
            writer.log(step, {"a": float(step)})
    first = json.loads((tmp_path / "trackers.json").read_text())
    with MetricsWriter(tmp_path, report_to=report_to, resume_step=2) as writer:  # killed after 3
        for step in (3, 4):
            writer.log(step, {"a": 10.0 * step})
    second = json.loads((tmp_path / "trackers.json").read_text())
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 30.0, 40.0]
    if "mlflow" in names:
        assert second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
        from mlflow.tracking import MlflowClient

        history = MlflowClient(second["mlflow"]["tracking_uri"]).get_metric_history(
            second["mlflow"]["run_id"], "a")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0),
                                                               (4, 40.0)]
    if "wandb" in names:
        assert second["wandb"]["run_id"] == first["wandb"]["run_id"]
        assert second["wandb"]["dir"] != first["wandb"]["dir"]  # offline: one directory per start
    # a fresh start (not a resume) makes new runs
    with MetricsWriter(tmp_path, report_to=report_to):
        pass
    third = json.loads((tmp_path / "trackers.json").read_text())
    assert all(third[n]["run_id"] != first[n]["run_id"] for n in names)


def test_mlflow_uses_the_users_store_and_no_telemetry(tmp_path, user_store, monkeypatch):
    need("mlflow")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    with MetricsWriter(tmp_path, report_to="mlflow") as writer:
        writer.log(1, {"a": 1.0})
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # set, as the user had not
    info = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert info["tracking_uri"] == user_store and info["experiment"] == "mine"
    assert not (tmp_path / "mlruns").exists() and mlflow_run(tmp_path)[0] == {"a": {1: 1.0}}


def test_mlflow_store_of_one_run_is_not_the_next_runs(sft_run, tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports the URI as MLFLOW_TRACKING_URI: a later run in the same
    process (tether run, demo, iterate) must still get a store of its own."""
    need("mlflow")
    import os

    from tether.training import trackers

    out, _, _ = sft_run
    assert "MLFLOW_TRACKING_URI" not in os.environ  # put back when the run's tracker closed
    own = f"sqlite:///{out.resolve() / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setattr(trackers, "_LOCAL_MLFLOW_URI", own)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own)  # as if it had not been put back (a crash)
    assert trackers.mlflow_store(tmp_path)[0] == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the user's: kept
    assert trackers.mlflow_store(tmp_path) == ("http://127.0.0.1:9", None)


# ----------------------------------------------------------------------------- refusals


def test_an_unknown_tracker_is_refused_listing_the_valid_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                 "--output-dir", str(out), "--report-to", "tensorboard,comet"]) == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'comet'" in err and "tensorboard, wandb, trackio, mlflow" in err
    assert not out.exists()


@pytest.mark.parametrize("name, extra", [("wandb", "tether[trackers]"), ("mlflow", "tether[trackers]"),
                                         ("trackio", "tether[trackers]")])
def test_a_missing_library_is_refused_before_anything_starts(name, extra, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    out = tmp_path / "run"
    assert main(["sft", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                 "--output-dir", str(out), "--report-to", f"tensorboard,{name}"]) == 2
    err = capsys.readouterr().err
    assert f"--report-to {name} needs the {name} package" in err and f"pip install '{extra}'" in err
    assert not out.exists()


def test_a_library_that_fails_to_import_names_the_extra(tmp_path, monkeypatch):
    from tether.errors import ConfigError
    from tether.training.trackers import Trackers

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'tether\[trackers\]'"):
        Trackers("tensorboard,wandb", tmp_path)
    assert not (tmp_path / "trackers.json").exists()


# ----------------------------------------------------------------------------- the older switch


def test_the_tensorboard_switch_still_works_and_folds_into_report_to(tmp_path):
    from tether.config import SFTConfig, load_config

    base = ["--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o")]

    def report_to(*extra):
        return load_config(SFTConfig, base + list(extra)).report_to

    assert report_to() == "tensorboard"
    assert report_to("--no-tensorboard") == "none"
    assert report_to("--report-to", "none", "--tensorboard") == "tensorboard"
    assert report_to("--report-to", "tensorboard,mlflow", "--tensorboard", "false") == "mlflow"
    # a config.yaml written before --report-to existed still loads, and means what it meant
    old = tmp_path / "old.yaml"
    old.write_text("stage: SFTConfig\ntensorboard: false\nprogress: false\n")
    assert report_to("--config", str(old)) == "none"
    assert report_to("--report-to", "TensorBoard, tensorboard") == "tensorboard"


def test_a_run_started_before_report_to_existed_resumes(tmp_path):
    """Its config.yaml has tensorboard: true and no report_to; both are logging options."""
    import dataclasses

    from tether.config import SFTConfig
    from tether.training.rundir import _compare_with_saved

    cfg = SFTConfig(model="m", data="d", output_dir=str(tmp_path), resume=True)
    saved = {"stage": "SFTConfig", **dataclasses.asdict(cfg), "tensorboard": True}
    del saved["report_to"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _compare_with_saved(cfg, tmp_path)  # no refusal
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**saved, "lora_r": 4}))
    with pytest.raises(Exception, match="lora-r"):  # while a real change still is refused
        _compare_with_saved(cfg, tmp_path)
