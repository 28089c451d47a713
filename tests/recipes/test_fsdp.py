"""`--fsdp` (sft, rm, dpo): torch FSDP2 over two CPU processes (gloo), against one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import story_rows, write_jsonl
from tether.cli import main
from tether.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def _args(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--lr", "1e-3",
            "--no-progress", "--no-tensorboard", "--eval-fraction", "0.1", *extra]


def _launch(*args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + len(args)) % 500), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tether", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _rows(out):
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}


def _without_dropout(src, dst):
    """A copy of the model with every dropout probability at 0: dropout masks are drawn per
    process, so with dropout no two launches of different sizes could agree."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    AutoModelForCausalLM.from_pretrained(src, config=config).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_two_sharded_processes_match_one_and_save_one_plain_model(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", story_rows(40))
    one, two = tmp_path / "one", tmp_path / "two"
    model = _without_dropout(tiny_models[arch], tmp_path / "model")
    assert main(_args(model, data, one, "--max-steps", "4", "--batch-size", "4")) == 0
    _launch(*_args(model, data, two, "--max-steps", "4", "--batch-size", "2", "--fsdp"))
    a, b = _rows(one), _rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # float error only: the same global batch, gradients reduced in another order
    for step in a:
        for key in ("train/loss", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (step, key)
    assert b[4]["eval/loss"] == pytest.approx(a[4]["eval/loss"], rel=1e-4)
    ckpt = two / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.glob("shard-*")} == {"shard-0-of-2.safetensors", "shard-1-of-2.safetensors"}
    assert not list(ckpt.glob("*.pkl")) and not list(ckpt.glob("*.bin"))
    # the final model is one ordinary directory: plain transformers loads it in one process,
    # and it computes what the one-process model computes
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(one).eval()(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(two).eval()(ids).logits
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, lb, atol=1e-3)  # it trained


def test_a_sharded_run_resumes_exactly(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(40))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--max-steps", "6", "--batch-size", "2", "--fsdp", "--keep-checkpoints", "5")
    _launch(*_args(tiny_models["llama"], data, full, *common, "--save-every", "3"))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    _launch(*_args(tiny_models["llama"], data, resumed, *common, "--save-every", "3", "--resume"))
    a, b = _rows(full), _rows(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6, abs=1e-7), step


def test_fsdp_is_refused_where_it_cannot_run(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", story_rows(8))
    out = tmp_path / "one"
    assert main(_args(tiny_models["llama"], data, out, "--max-steps", "1", "--fsdp")) == 2
    assert "--num_processes N" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was left behind
    assert main(_args(tiny_models["llama"], data, out, "--fsdp", "--lora-r", "4")) == 2
    assert "--fsdp cannot be combined with --lora-r" in capsys.readouterr().err


def test_sharded_dpo_matches_one_process_and_samples_for_its_kl(tiny_models, tmp_path):
    rows = story_rows(24)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": rows[(i + 1) % len(rows)]["completion"]}
                                               for i, r in enumerate(rows)])
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--model", str(tiny_models["llama"]), "--data", str(pairs), "--lr", "1e-3", "--max-steps", "3",
            "--no-progress", "--no-tensorboard", "--eval-fraction", "0.2", "--kl-samples", "4",
            "--kl-response-length", "6")
    assert main(["dpo", "--output-dir", str(one), "--batch-size", "4", *args]) == 0
    _launch("dpo", "--output-dir", str(two), "--batch-size", "2", "--fsdp", *args)
    a, b = _rows(one), _rows(two)
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
    # the KL to the reference after training: sampled from the sharded policy on every process
    summary_a = json.loads((one / "tether_run.json").read_text())
    summary_b = json.loads((two / "tether_run.json").read_text())
    assert summary_b["eval/kl_ref"] == pytest.approx(summary_a["eval/kl_ref"], rel=1e-3, abs=1e-4)


def test_a_sharded_reward_model_matches_one_process(tiny_models, tmp_path):
    from tether.models.load import load_tokenizer
    from tether.models.reward import load_reward_model, score_texts

    rows = story_rows(24)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": rows[(i + 1) % len(rows)]["completion"]}
                                               for i, r in enumerate(rows)])
    model = _without_dropout(tiny_models["llama"], tmp_path / "model")
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--data", str(pairs), "--lr", "1e-3", "--max-steps", "3", "--no-progress",
            "--no-tensorboard", "--eval-fraction", "0.2")
    assert main(["rm", "--model", str(model), "--output-dir", str(one), "--batch-size", "4", *args]) == 0
    _launch("rm", "--model", str(model), "--output-dir", str(two), "--batch-size", "2", "--fsdp", *args)
    a, b = _rows(one), _rows(two)
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
    assert b[3]["eval/accuracy"] == a[3]["eval/accuracy"]
    # calibrated the same way (every process scored the calibration set), saved as one RM
    prompts, responses = [r["prompt"] for r in rows[:6]], [r["completion"] for r in rows[:6]]
    sa, sb = (score_texts(load_reward_model(str(d)).eval(), load_tokenizer(str(d)), prompts, responses)
              for d in (one, two))
    assert sb == pytest.approx(sa, abs=1e-4)
