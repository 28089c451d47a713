"""`tether run PIPELINE.yaml`: validation before work, skipping finished stages, and an
interruption in the middle of PPO that a rerun resumes and finishes."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tether.cli import main
from tether.training.metrics import read_metrics

from conftest import story_rows, write_jsonl


def _pipeline(tmp_path, stories, ppo_steps):
    sft = write_jsonl(tmp_path / "sft.jsonl", story_rows(32))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": " the the the the."}
        for r in story_rows(32, seed=3)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in story_rows(32)])
    common = {"progress": False, "tensorboard": False}
    spec = {"output_dir": str(tmp_path / "pipe"), "stages": [
        {"name": "sft", "stage": "sft", "model": str(stories), "data": str(sft), "max_steps": 2, **common},
        {"name": "rm", "stage": "rm", "model": "${sft}", "data": str(pairs), "max_steps": 2, **common},
        {"name": "ppo", "stage": "ppo", "policy": "${sft}", "reward_model": "${rm}", "prompts": str(prompts),
         "max_steps": ppo_steps, "batch_size": 4, "response_length": 8, "save_every": 1000, **common},
    ]}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_pipeline_is_refused_before_any_work(tmp_path, stories, capsys):
    path = _pipeline(tmp_path, stories, 2)
    spec = yaml.safe_load(path.read_text())
    spec["stages"][2]["policy"] = "${nope}"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    assert "${nope} does not name an earlier stage" in capsys.readouterr().err
    spec["stages"][2]["policy"] = "${sft}"
    spec["stages"][1]["lr"] = "fast"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    assert "stage 2 (rm): --lr must be a number" in capsys.readouterr().err
    assert not (tmp_path / "pipe").exists()  # nothing ran


def test_pipeline_interrupted_mid_ppo_resumes_and_finishes(tmp_path, stories):
    path = _pipeline(tmp_path, stories, ppo_steps=60)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tether", "run", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "pipe" / "ppo" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-3000:]
    assert not json.loads((tmp_path / "pipe" / "ppo" / "tether_run.json").read_text()
                          if (tmp_path / "pipe" / "ppo" / "tether_run.json").exists() else "{}").get("complete")
    done = subprocess.run([sys.executable, "-m", "tether", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "sft is complete" in log and "rm is complete" in log and "ppo has checkpoints" in log
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, 61))
    assert json.loads((tmp_path / "pipe" / "ppo" / "tether_run.json").read_text())["complete"] is True
