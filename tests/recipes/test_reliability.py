"""The reliability battery: bad inputs and faults, one row per case, across the stages where the
case applies. Each row checks the exit code, that the message names what to fix (the file and
line, or the option), and that no byte of any input or existing model changed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tether.cli import main
from tether.training.checkpoint import list_checkpoints

from conftest import write_jsonl

MARKER = "tether_run.json"


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny models run faster on one thread (see conftest)."""


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """A base model, a reward model, and data for every stage, under one root whose bytes the
    battery hashes before and after each case."""
    from tether.models.load import load_tokenizer
    from tether.models.reward import init_reward_model

    root = tmp_path_factory.mktemp("inputs")
    base = root / "base"
    shutil.copytree(tiny_models["llama"], base)
    rm = root / "rm"
    init_reward_model(str(base), pad_token_id=0, seed=1).save_pretrained(rm)
    load_tokenizer(str(base)).save_pretrained(rm)
    names = ["Lily", "Tom", "Sue", "Ben"]
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": f"Once upon a time, {n} saw a",
                                            "completion": f" ball. {n} was happy."} for n in names * 4])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": f"{n} saw a", "chosen": " big red ball.",
                                                "rejected": " sad tree."} for n in names * 4])
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Once upon a time, {n} saw a"}
                                                   for n in names * 2])
    return SimpleNamespace(root=root, base=base, rm=rm, sft=sft, pairs=pairs, prompts=prompts)


QUIET = ["--no-progress"]
TRAIN = ["--max-steps", "2", "--batch-size", "4", "--no-tensorboard", *QUIET]


def stage_args(w, stage, out, **inputs):
    """The arguments of a small, fast run of `stage` into `out`; `inputs` replace its inputs."""
    model = str(inputs.get("model", w.base))
    if stage == "sft":
        return ["sft", "--model", model, "--data", str(inputs.get("data", w.sft)), "--output-dir", str(out),
                "--eval-fraction", "0", *TRAIN]
    if stage in ("rm", "dpo"):
        return [stage, "--model", model, "--data", str(inputs.get("data", w.pairs)), "--output-dir",
                str(out), "--eval-fraction", "0", *TRAIN]
    if stage == "ppo":
        return ["ppo", "--policy", model, "--reward-model", str(w.rm), "--prompts",
                str(inputs.get("data", w.prompts)), "--output-dir", str(out), "--max-steps", "2",
                "--batch-size", "4", "--response-length", "4", "--no-tensorboard", *QUIET]
    if stage == "bon":
        return ["bon", "--policy", model, "--reward-model", str(w.rm), "--prompts",
                str(inputs.get("data", w.prompts)), "--output-dir", str(out), "--n", "2",
                "--response-length", "4", *QUIET]
    raise ValueError(stage)


def tree_hash(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(capsys, args):
    """Exit code, and stderr with tether's log lines (collected at the logger itself, whatever
    stream an earlier test left its handler on)."""
    capsys.readouterr()
    collect, logger = _Collect(), logging.getLogger("tether")
    logger.addHandler(collect)
    try:
        code = main([str(a) for a in args])
    finally:
        logger.removeHandler(collect)
    return code, capsys.readouterr().err + "\n".join(collect.lines)


def expect(capsys, w, args, code, *needles, guarded=()):
    """Run `args`: exit `code`, every needle in the error, and no byte of the inputs (or of
    `guarded`) changed."""
    before = tree_hash(w.root, *guarded)
    got, err = run(capsys, args)
    assert got == code, (got, err[-2000:])
    for needle in needles:
        assert needle in err, (needle, err[-2000:])
    assert tree_hash(w.root, *guarded) == before
    return err


ALL = ["sft", "rm", "dpo", "ppo", "bon"]
TRAINING = ["sft", "rm", "dpo", "ppo"]


# ----------------------------------------------------------------------------- overwrites


@pytest.mark.parametrize("stage", ALL)
def test_output_equal_to_or_inside_an_input_is_refused(stage, world, capsys):
    for out in (world.base, world.base / "run"):
        expect(capsys, world, stage_args(world, stage, out), 2, "would overwrite what it reads")
    assert not (world.base / "run").exists()


@pytest.mark.parametrize("stage", ALL)
def test_a_directory_holding_a_model_is_written_only_with_overwrite(stage, world, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(world.base, other)
    expect(capsys, world, stage_args(world, stage, other), 2, "holds a model", "--overwrite",
           guarded=[other])


@pytest.mark.parametrize("stage", ALL)
def test_a_finished_run_is_not_replaced_even_without_its_checkpoints(stage, world, tmp_path, capsys):
    done = tmp_path / "done"
    done.mkdir()
    (done / MARKER).write_text(json.dumps({"stage": stage, "complete": True}))
    (done / "config.yaml").write_text("stage: old\n")
    for extra in ([], ["--resume"]):
        expect(capsys, world, stage_args(world, stage, done) + extra, 2, "finished run", "--overwrite",
               guarded=[done])


@pytest.mark.parametrize("stage", ALL)
def test_a_failed_start_leaves_no_directory_behind(stage, world, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"nothing": "here"}])
    out = tmp_path / "fresh"
    expect(capsys, world, stage_args(world, stage, out, data=bad), 1, "bad.jsonl", "found columns")
    assert not out.exists()


@pytest.mark.parametrize("stage", ALL)
def test_an_output_dir_that_is_a_file_is_a_usage_error(stage, world, tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    expect(capsys, world, stage_args(world, stage, out), 2, "is a file", guarded=[out])


def test_overwrite_replaces_a_finished_run_and_its_stale_marker(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, stage_args(world, "sft", out))[0] == 0
    old = json.loads((out / MARKER).read_text())
    (out / "checkpoints" / "step-2" / "trainer_state.json").unlink()  # a run killed mid-way...
    (out / MARKER).write_text(json.dumps(old))  # ...that left an old marker behind
    assert run(capsys, stage_args(world, "sft", out, data=tmp_path / "missing.jsonl")
               + ["--overwrite"])[0] == 1
    assert not (out / MARKER).exists()  # the failed new run did not leave the old marker


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_non_finite_step_is_never_applied_or_saved(stage, world, tmp_path, capsys):
    out = tmp_path / "run"
    args = stage_args(world, stage, out) + ["--lr", "1e30", "--save-every", "1", "--max-steps", "6"]
    err = expect(capsys, world, args, 1, "was not taken", "No weight was changed")
    from safetensors.torch import load_file

    for ckpt in list_checkpoints(out):  # every checkpoint written is finite, and named right
        for f in ckpt.glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
    last = list_checkpoints(out)
    assert (str(last[-1]) in err) if last else "No checkpoint was written" in err
    assert not (out / "model.safetensors").exists() and not (out / MARKER).exists()


# ----------------------------------------------------------------------------- resume


def _unfinished(world, capsys, out, stage="sft"):
    """A run that stopped after its last checkpoint, before its final save."""
    assert run(capsys, stage_args(world, stage, out) + ["--save-every", "1"])[0] == 0
    (out / MARKER).unlink()


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_resume_refuses_changed_options_and_keeps_the_config_history(stage, world, tmp_path, capsys):
    out = tmp_path / "run"
    _unfinished(world, capsys, out, stage)
    saved = (out / "config.yaml").read_text()
    args = stage_args(world, stage, out) + ["--resume", "--save-every", "1"]
    i = args.index("--batch-size")
    changed = args[:i + 1] + ["2"] + args[i + 2:]
    expect(capsys, world, changed, 2, "--batch-size: 4 -> 2", guarded=[out / "config.yaml"])
    assert (out / "config.yaml").read_text() == saved
    ok = args[:args.index("--max-steps") + 1] + ["3"] + args[args.index("--max-steps") + 2:]
    assert run(capsys, ok + ["--lr", "2e-4"])[0] == 0
    assert (out / "config-history" / "config-1.yaml").read_text() == saved
    assert "max_steps: 3" in (out / "config.yaml").read_text()


def test_resume_uses_a_changed_learning_rate(world, tmp_path, capsys):
    from tether.training.metrics import read_metrics

    out = tmp_path / "run"
    args = stage_args(world, "sft", out) + ["--save-every", "1", "--lr-scheduler", "constant",
                                            "--warmup-ratio", "0", "--log-every", "1"]
    assert run(capsys, args)[0] == 0
    (out / MARKER).unlink()
    i = args.index("--max-steps")
    more = args[:i + 1] + ["4"] + args[i + 2:]
    assert run(capsys, more + ["--resume", "--lr", "1e-6"])[0] == 0
    lrs = [r["train/lr"] for r in read_metrics(out / "metrics.jsonl")]
    assert lrs[:2] == pytest.approx([5e-5, 5e-5]) and lrs[2:] == pytest.approx([1e-6, 1e-6])


def test_resume_with_nothing_to_resume_says_so(world, tmp_path, capsys):
    err = expect(capsys, world, stage_args(world, "sft", tmp_path / "new") + ["--resume"], 0)
    assert "holds no checkpoint to resume from" in err


def test_a_torn_metrics_line_and_a_truncated_checkpoint_are_survived(world, tmp_path, capsys):
    out = tmp_path / "run"
    _unfinished(world, capsys, out)
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "train/lo')  # killed mid-write
    (out / "checkpoints" / ".tmp-step-9").mkdir()  # a half-written checkpoint of a killed run
    latest = list_checkpoints(out)[-1]
    weights = next(latest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    i = stage_args(world, "sft", out).index("--max-steps")
    args = stage_args(world, "sft", out)
    args[i + 1] = "3"
    err = expect(capsys, world, args + ["--resume", "--save-every", "1"], 0)
    assert "cannot be loaded" in err and "not a complete JSON line" in err
    assert not list((out / "checkpoints").glob(".tmp-step-*"))


# ----------------------------------------------------------------------------- security


class Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(out: Path, marker: Path) -> int:
    planted = 0
    for ckpt in list_checkpoints(out):
        for f in ckpt.iterdir():
            if f.suffix in (".pkl", ".bin", ".pt", ".pth"):
                f.write_bytes(pickle.dumps(Payload(marker)))
                planted += 1
        (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
        planted += 1
    return planted


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_no_file_of_a_checkpoint_is_unpickled_on_resume(stage, world, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    _unfinished(world, capsys, out, stage)
    assert _plant(out, marker) > 2
    err = expect(capsys, world, stage_args(world, stage, out) + ["--resume", "--save-every", "1"], 1,
                 "can be loaded")
    assert not marker.exists(), err


def test_tether_run_does_not_unpickle_a_checkpoint(world, tmp_path, capsys):
    out, marker = tmp_path / "pipe", tmp_path / "pwned"
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(f"output_dir: {out}\nstages:\n  - name: sft\n    stage: sft\n"
                    f"    model: {world.base}\n    data: {world.sft}\n    max_steps: 2\n"
                    "    batch_size: 4\n    save_every: 1\n    eval_fraction: 0\n    progress: false\n"
                    "    tensorboard: false\n")
    assert run(capsys, ["run", spec])[0] == 0
    (out / "sft" / MARKER).unlink()
    assert _plant(out / "sft", marker) > 2
    run(capsys, ["run", spec])
    assert not marker.exists()


# ----------------------------------------------------------------------------- data errors


@pytest.mark.parametrize("stage", ["sft", "ppo", "bon"])
def test_data_errors_name_the_file_and_the_line(stage, world, tmp_path, capsys):
    column = "completion" if stage == "sft" else "prompt"
    good = {"prompt": "Once upon a time, Tom saw a", "completion": " ball."}
    cases = {  # file -> what the message must say
        "empty.jsonl": ([good] * 5 + [{**good, column: ""}] + [good] * 10, ":6", "empty"),
        "space.jsonl": ([good] * 3 + [{**good, column: "  "}], ":4", "whitespace"),
        "number.jsonl": ([good] * 2 + [{**good, column: 42}], ":3", "holds a number"),
        "numbers.jsonl": ([{**good, column: 7}] * 3, ":1", "not a string"),
        "typed.jsonl": ([good] * 3 + [{**good, column: ["a list"]}], ":4", f"column '{column}'"),
    }
    for name, (rows, line, what) in cases.items():
        path = write_jsonl(world.root / f"{stage}-{name}", rows)
        expect(capsys, world, stage_args(world, stage, tmp_path / name, data=path), 1,
               f"{path.name}{line}", what)
    latin = world.root / f"{stage}-latin.jsonl"
    latin.write_bytes(json.dumps(good).encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    expect(capsys, world, stage_args(world, stage, tmp_path / "latin", data=latin), 1,
           f"{latin.name}:2", "UTF-8", "iconv")


def test_a_held_out_split_that_is_all_too_long_does_not_stop_the_run(world, tmp_path, capsys):
    held = write_jsonl(world.root / "long-eval.jsonl",
                       [{"prompt": "Once upon a time " * 60, "completion": " ball."}])
    args = stage_args(world, "sft", tmp_path / "run") + ["--eval-data", held, "--max-length", "64"]
    err = expect(capsys, world, args, 0)
    assert "every held-out example is longer" in err


@pytest.mark.parametrize("stage", ALL)
def test_a_model_that_is_not_there_or_has_no_tokenizer_is_named(stage, world, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "model"
    expect(capsys, world, stage_args(world, stage, tmp_path / "a", model=missing), 2,  # a usage error
           str(missing), "no such directory")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (world.base / f).exists():
            shutil.copy(world.base / f, bare / f)
    expect(capsys, world, stage_args(world, stage, tmp_path / "b", model=bare), 1,
           "has no tokenizer files", guarded=[bare])


# ----------------------------------------------------------------------------- option values


@pytest.mark.parametrize("stage,option,value,needle", [
    *[(s, "--lr", v, "finite") for s in TRAINING for v in ("nan", "inf")],
    ("ppo", "--temperature", "inf", "finite"), ("ppo", "--kl-coef", "nan", "finite"),
    ("ppo", "--vf-coef", "nan", "finite"), ("bon", "--temperature", "inf", "finite"),
    ("ppo", "--ignore-eos", "true", "--missing-eos-penalty none"),
    *[(s, "--max-grad-norm", "-1", "--max-grad-norm must be >= 0") for s in TRAINING],
    *[(s, "--weight-decay", "-5", "--weight-decay must be >= 0") for s in ("sft", "rm", "dpo")],
])
def test_option_values_that_cannot_work_are_usage_errors(stage, option, value, needle, world,
                                                         tmp_path, capsys):
    out = tmp_path / "run"
    expect(capsys, world, stage_args(world, stage, out) + [option, value], 2, needle, option)
    assert not out.exists()


def test_kl_target_from_a_zero_kl_coef_is_refused(world, tmp_path, capsys):
    args = stage_args(world, "ppo", tmp_path / "run") + ["--kl-coef", "0", "--kl-target", "1"]
    expect(capsys, world, args, 2, "--kl-target", "--kl-coef")


def test_a_yaml_typo_names_the_yaml_file(world, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("max_stpes: 3\n")
    expect(capsys, world, stage_args(world, "sft", tmp_path / "run") + ["--config", config], 2,
           str(config), "--max-steps")


def test_metrics_hold_only_json(world, tmp_path):
    from tether.training.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, report_to="none")
    writer.log(1, {"a": float("inf"), "b": float("nan"), "c": 1.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "a": None, "b": None, "c": 1.5}
    assert "Infinity" not in line and "NaN" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_a_usage_error(world, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        expect(capsys, world, stage_args(world, "sft", out), 2, "cannot write to --output-dir")
    finally:
        out.chmod(0o700)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(world, tmp_path, capsys, monkeypatch):
    """The second checkpoint's write fails as a full disk does: a clear error, the first
    checkpoint intact and loadable, nothing half-written left."""
    import errno

    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "run"
    err = expect(capsys, world, stage_args(world, "sft", out) + ["--save-every", "1"], 1,
                 "could not write the checkpoint of step 2", "No space left on device",
                 "step-1, is intact")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"], err
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert run(capsys, stage_args(world, "sft", out) + ["--save-every", "1", "--resume"])[0] == 0


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("env,says", [("ACCELERATE_USE_FSDP", "pass --fsdp to the stage"),
                                      ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed is not supported")])
def test_a_launch_tether_would_not_run_as_asked_is_refused(env, says, gpu, world, tmp_path, capsys,
                                                           monkeypatch):
    """accelerate's FSDP plugin and DeepSpeed are refused before anything is written, saying
    what to launch instead: on CPUs `accelerate launch --use_fsdp --num_processes 2` starts
    processes that each think they are alone; on GPUs tether shards with FSDP2 itself."""
    from tether.training import launch

    monkeypatch.setenv(env, "true")
    monkeypatch.setattr(launch, "_has_accelerator_device", lambda: gpu)
    out = tmp_path / "run"
    err = expect(capsys, world, stage_args(world, "sft", out), 2, "--multi_gpu --num_processes N")
    assert says in err
    assert ("not connected" in err) == (not gpu)
    assert not out.exists()
