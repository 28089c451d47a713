"""Exact resume, SIGTERM handling, and 2-process training matching 1 process."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tether.cli import main
from tether.training.checkpoint import list_checkpoints
from tether.training.metrics import read_metrics

from conftest import story_rows, write_jsonl


def _sft_args(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--no-tensorboard",
            "--eval-fraction", "0", *extra]


def _losses(out):
    return {r["step"]: r["train/loss"] for r in read_metrics(out / "metrics.jsonl")}


def test_resume_reproduces_the_uninterrupted_losses(stories, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(40))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(_sft_args(stories, data, full, "--max-steps", "12", "--save-every", "5",
                          "--keep-checkpoints", "5")) == 0
    # start the second run from the step-5 checkpoint the first run wrote
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-5", resumed / "checkpoints" / "step-5")
    assert main(_sft_args(stories, data, resumed, "--max-steps", "12", "--resume")) == 0
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == list(range(6, 13))  # nothing before the checkpoint was re-run
    for step in range(6, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(stories, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(40))
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = _sft_args(stories, data, out, "--max-steps", "150", "--save-every", "1000", "--batch-size", "2")
    # the same number of threads as the runs in this process below, which the losses are held
    # to: another count sums in another order, and 150 steps carry that rounding past 1e-6
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "tether", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "--resume" in output and "Traceback" not in output
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < 150
    assert not (out / "model.safetensors").exists()  # no final model from an unfinished run
    assert main(args + ["--resume"]) == 0
    assert main(_sft_args(stories, data, ref, "--max-steps", "150", "--save-every", "1000",
                          "--batch-size", "2")) == 0
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == list(range(1, 151))
    for step in (stopped_at + 1, stopped_at + 2, 150):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_two_processes_match_one_process(stories, tmp_path):
    pytest.importorskip("accelerate")
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(48))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_sft_args(stories, data, one, "--max-steps", "6", "--batch-size", "4")) == 0
    # on a machine without GPUs, accelerate's multi-process launcher runs DDP over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + os.getpid() % 500),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "tether", *_sft_args(stories, data, two, "--max-steps", "6", "--batch-size", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert (two / "model.safetensors").exists()


def test_checkpointing_a_tied_model_does_not_print_accelerates_alias_notice(stories, tmp_path, caplog):
    """stories260K ties lm_head to the embeddings. accelerate stores the pair once and warns that
    a reload may lose the alias; for a checkpoint it cannot (load_state fills the live, still
    tied modules; the resume test above runs this model), so tether drops that one notice."""
    import logging

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from tether.training.checkpoint import load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(stories))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with caplog.at_level(logging.WARNING):
        ckpt = save_checkpoint(accelerator, tmp_path, step=1, state={})
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    assert not logging.getLogger("accelerate.utils.other").filters  # the filter is removed again
    before = model.get_output_embeddings().weight.detach().clone()
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    assert load_checkpoint(accelerator, tmp_path)[0] == ckpt
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight == before).all()
