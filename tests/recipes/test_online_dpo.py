"""`tether online-dpo` end to end on a tiny Llama: pairs sampled from the policy and labelled by a
Python reward function raise that reward in the run and from outside; every pair loss and the
LM judge run; micro-batches give the update of the whole minibatch; a resumed run repeats the
uninterrupted one; bad options are refused before anything loads."""

import pytest

from tether.cli import main
from tether.config import OnlineDPOConfig, from_dict
from tether.errors import ConfigError
from tether.training.metrics import read_metrics

from conftest import VOWELS_REWARD, vowel_reward_outside, write_jsonl


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny models run faster on one thread (see conftest)."""


@pytest.fixture(scope="module")
def task(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("online_dpo_task")
    (root / "rewards.py").write_text(VOWELS_REWARD)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Once upon a time, {n} saw a"}
                                                    for n in ["Lily", "Tom", "Sue", "Ben"] * 4])
    return root, tiny_models["llama"], prompts


def _args(task, out, *extra, labeler=None):
    root, policy, prompts = task
    labeler = labeler or ["--reward-fn", f"{root / 'rewards.py'}:vowels"]
    return ["online-dpo", "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(out),
            *labeler, "--batch-size", "8", "--response-length", "6", "--lr", "1e-2", "--beta", "0.5",
            "--temperature", "1.0", "--no-progress", "--no-tensorboard", *extra]


def test_the_reward_rises_in_the_run_and_from_outside(task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, out, "--max-steps", "30")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    early = sum(r["reward_fn/vowels/mean"] for r in rows[:5]) / 5
    late = sum(r["reward_fn/vowels/mean"] for r in rows[-5:]) / 5
    assert late > early + 0.05, (early, late)
    assert vowel_reward_outside(task[0] / "rewards.py", out) > \
        vowel_reward_outside(task[0] / "rewards.py", task[1]) + 0.05
    assert not (out / "critic").exists() and "val/explained_var" not in rows[0]
    for key in ("dpo/labelled_frac", "rewards/accuracy", "rewards/margin", "objective/kl", "policy/loss"):
        assert key in rows[0], key
    assert rows[-1]["objective/kl"] > 0  # the policy moved away from the reference


@pytest.mark.parametrize("extra", [("--loss", "ipo"), ("--loss", "hinge"),
                                   ("--loss", "robust", "--label-smoothing", "0.1"),
                                   ("--loss", "conservative", "--label-smoothing", "0.1"),
                                   ("--ppo-epochs", "2", "--mini-batch-size", "8", "--mask-truncated")])
def test_every_loss_and_option_runs(extra, task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, out, "--max-steps", "2", *extra)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["policy/loss"] is not None for r in rows)


def test_micro_batches_give_the_update_of_the_whole_minibatch(task, tmp_path):
    """A mean over pairs: micro-batches of whole pairs, each weighted by its share of them."""
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    for out, extra in ((whole, ()), (micro, ("--micro-batch-size", "4"))):
        assert main(_args(task, out, "--max-steps", "2", *extra)) == 0
    for a, b in zip(read_metrics(whole / "metrics.jsonl"), read_metrics(micro / "metrics.jsonl")):
        for key in ("policy/loss", "policy/grad_norm", "objective/kl", "rewards/margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_an_lm_judge_labels_the_pairs(task, tiny_models, tmp_path):
    out = tmp_path / "run"
    # the tiny vocabulary has "▁a" and "▁b" as single tokens (see test_judge)
    judge = ["--judge", str(tiny_models["gpt2"]), "--judge-answer-tokens", "a,b"]
    assert main(_args(task, out, "--max-steps", "2", "--dtype", "float32", labeler=judge)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all(0 < r["dpo/labelled_frac"] <= 1 for r in rows)
    assert all(0 <= r["objective/rm_score"] <= 1 for r in rows)  # the judge's p(better)


def test_resume_repeats_the_uninterrupted_run(task, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(task, full, "--max-steps", "4")) == 0
    assert main(_args(task, cut, "--max-steps", "2", "--save-every", "1")) == 0
    (cut / "tether_run.json").unlink()  # as if it had stopped after its second checkpoint
    assert main(_args(task, cut, "--max-steps", "4", "--resume")) == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    keys = [k for k in a[0] if not k.startswith("timing/") and k != "memory/rss_mb"]  # measured
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]


@pytest.mark.parametrize("extra, message", [
    ({"judge": "j", "reward_model": "rm"}, "one labeler"),
    ({}, "--reward-model is required"),
    ({"reward_fn": ["f.py:g"], "micro_batch_size": 3}, "even numbers"),
    ({"reward_fn": ["f.py:g"], "label_smoothing": 0.1}, "does not use it"),
    ({"reward_fn": ["f.py:g"], "kl_coef": 0.1}, "unknown option --kl-coef"),
    ({"reward_fn": ["f.py:g"], "loss": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
])
def test_bad_options_are_refused(extra, message):
    base = {"policy": "p", "prompts": "x.jsonl", "output_dir": "o"}
    with pytest.raises(ConfigError, match=message):
        from_dict(OnlineDPOConfig, {**base, **extra})
