"""`tether iterate`: rounds of sampling, labelling, RM retraining and PPO, kept and resumable."""

import json

import pytest
import yaml

from conftest import write_jsonl
from tether.cli import main
from tether.feedback.items import read_items
from tether.feedback.labels import LabelFile, make_record
from tether.recipes import iterate
from tether.world import World

pytestmark = pytest.mark.slow


@pytest.fixture
def world_prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in World(0).prompts(24, "train")])


def _args(policy, prompts, out, *extra):
    return ["iterate", "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(out),
            "--prompts-per-round", "8", "--k", "3", "--rm-steps", "2", "--rm-batch-size", "4",
            "--ppo-steps", "1", "--ppo-batch-size", "4", "--response-length", "6", "--temperature", "1.5",
            "--heldout-fraction", "0.3", "--no-progress", "--no-tensorboard", *extra]


def test_round_prompts_differ_between_rounds_and_heldout_is_a_fixed_share():
    prompts = [f"p{i}" for i in range(30)]
    r1, r2 = (iterate.round_prompts(prompts, n, 10, seed=0) for n in (1, 2))
    assert len(set(r1)) == len(set(r2)) == 10 and not set(r1) & set(r2)
    assert iterate.round_prompts(prompts, 1, 10, seed=0) == r1
    keys = [f"{i:016x}"[::-1] for i in range(4000)]
    share = sum(iterate.is_heldout(k, 0.25) for k in keys) / len(keys)
    assert 0.2 < share < 0.3


def test_two_rounds_with_the_world_rater_then_resume_mid_round(tiny_models, world_prompts, tmp_path, monkeypatch):
    sft, out = tiny_models["llama"], tmp_path / "iter"
    real_ppo = iterate.run_round_ppo

    def crash_in_round_2(cfg, rdir, n, policy, reference):
        if n == 2:
            raise KeyboardInterrupt
        real_ppo(cfg, rdir, n, policy, reference)

    monkeypatch.setattr(iterate, "run_round_ppo", crash_in_round_2)
    assert main(_args(sft, world_prompts, out, "--gold-judge", "world")) == 130
    monkeypatch.setattr(iterate, "run_round_ppo", real_ppo)
    kept = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    kept.update({p: p.stat().st_mtime_ns for p in (out / "round-2").glob("*.jsonl")})
    assert main(_args(sft, world_prompts, out, "--gold-judge", "world")) == 2  # no silent rerun
    assert main(_args(sft, world_prompts, out, "--gold-judge", "world", "--resume")) == 0
    # round 1's outputs and round 2's samples and labels were kept, not redone
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    summary = json.loads((out / "iterate.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    r2 = summary["rounds"][1]
    for key in ("rm_accuracy_before", "rm_accuracy_after", "rm_accuracy_gold_before", "rm_accuracy_gold_after"):
        assert r2[key] is None or 0.0 <= r2[key] <= 1.0
    assert r2["policy"] == str(out / "round-1" / "ppo")
    ppo2 = yaml.safe_load((out / "round-2" / "ppo" / "config.yaml").read_text())
    assert ppo2["policy"] == str(out / "round-1" / "ppo") and ppo2["reference"] == str(sft)
    assert ppo2["reward_model"] == str(out / "round-2" / "rm")
    # round 2's RM was trained on both rounds' training labels
    labels = [LabelFile(out / f"round-{n}" / "labels.jsonl").read() for n in (1, 2)]
    trained = [json.loads(line) for line in (out / "round-2" / "rm_data.jsonl").read_text().splitlines()]
    expected = sum(1 for rs in labels for r in rs
                   if len(set(r["ranks"])) > 1 and not iterate.is_heldout(r["item"], 0.3))
    assert len(trained) == expected > 0
    assert all(r["rater"] == "world" and len(r["gold"]) == len(r["responses"]) for rs in labels for r in rs)
    # the saved policy of the last round loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "round-2" / "ppo")


def test_a_person_labels_between_runs(tiny_models, world_prompts, tmp_path, capsys):
    sft, out = tiny_models["llama"], tmp_path / "iter"
    args = _args(sft, world_prompts, out, "--labeler", "human", "--rounds", "1", "--k", "2")
    assert main(args) == 0
    said = capsys.readouterr().out
    candidates = out / "round-1" / "candidates.jsonl"
    assert "await a person" in said and f"tether label --input {candidates}" in said
    assert not (out / "round-1" / "rm").exists()
    items = read_items(str(candidates))
    # a person labels every item (as tether label writes them), then the run goes on
    LabelFile(out / "round-1" / "labels.jsonl").append(
        [make_record(it, [0, 1], "ann", "chose") for it in items])
    assert main(args + ["--resume"]) == 0
    assert (out / "round-1" / "ppo" / "model.safetensors").exists()
    assert json.loads((out / "iterate.json").read_text())["rounds"][0]["round"] == 1


def test_reference_must_share_the_vocabulary_and_not_come_with_lora(tiny_models, world_prompts, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(tiny_models["llama"]), "--data", str(pairs), "--output-dir", str(rm),
                 "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0", "--no-progress",
                 "--no-tensorboard"]) == 0
    base = ["ppo", "--policy", str(tiny_models["llama"]), "--reward-model", str(rm), "--prompts",
            str(world_prompts), "--max-steps", "1", "--batch-size", "2", "--response-length", "4",
            "--no-progress", "--no-tensorboard"]
    assert main(base + ["--output-dir", str(tmp_path / "a"), "--reference", str(tiny_models["gpt2"])]) == 2
    assert "does not share the policy's vocabulary" in capsys.readouterr().err
    assert main(base + ["--output-dir", str(tmp_path / "b"), "--reference", str(tiny_models["llama"]),
                        "--lora-r", "4"]) == 2
    assert "--reference cannot be used with --lora-r" in capsys.readouterr().err


def test_an_lm_judge_labels_a_round(tiny_models, world_prompts, tmp_path):
    out = tmp_path / "iter"
    assert main(_args(tiny_models["llama"], world_prompts, out, "--labeler", "judge", "--judge",
                      str(tiny_models["gpt2"]), "--rounds", "1", "--k", "2")) == 0
    records = LabelFile(out / "round-1" / "labels.jsonl").read()
    assert records and all(r["rater"] == "judge:gpt2" and 0.0 <= r["confidence"] <= 1.0 for r in records)
    assert (out / "round-1" / "ppo" / "model.safetensors").exists()
