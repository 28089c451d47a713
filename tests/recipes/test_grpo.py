"""`tether grpo` and `tether rloo` end to end on a tiny Llama with a Python reward: they raise
the reward in the run and from outside, every option runs, a resumed run repeats the
uninterrupted one, and a group without reward variance is reported."""

import pytest

from tether.cli import main
from tether.training.metrics import read_metrics

from conftest import VOWELS_REWARD, vowel_reward_outside, write_jsonl

REWARDS = VOWELS_REWARD + '''
def constant(prompts, completions, **_):
    return [1.0] * len(completions)
'''


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny models run faster on one thread (see conftest)."""


@pytest.fixture(scope="module")
def task(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_task")
    (root / "rewards.py").write_text(REWARDS)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Once upon a time, {n} saw a"}
                                                    for n in ["Lily", "Tom", "Sue", "Ben"] * 4])
    return root, tiny_models["llama"], prompts


def _args(task, stage, out, *extra, reward="vowels"):
    root, policy, prompts = task
    return [stage, "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(out),
            "--reward-fn", f"{root / 'rewards.py'}:{reward}", "--batch-size", "4",
            "--num-generations", "4", "--response-length", "6", "--lr", "1e-2",
            "--temperature", "1.0", "--no-progress", "--no-tensorboard", *extra]


def _outside(task, model_dir, n=64):
    """The reward of samples of a saved policy, drawn with plain transformers."""
    return vowel_reward_outside(task[0] / "rewards.py", model_dir, n)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_the_reward_rises_in_the_run_and_from_outside(stage, task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, stage, out, "--max-steps", "25")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    early = sum(r["reward_fn/vowels/mean"] for r in rows[:4]) / 4
    late = sum(r["reward_fn/vowels/mean"] for r in rows[-4:]) / 4
    assert late > early + 0.08, (early, late)
    assert _outside(task, out) > _outside(task, task[1]) + 0.05
    assert "val/explained_var" not in rows[0] and not (out / "critic").exists()
    for key in ("objective/frac_reward_zero_std", "response/truncated_frac", "policy/clip_ratio_low",
                "policy/clip_ratio_high", "reward_fn/vowels/std"):
        assert key in rows[0], key


@pytest.mark.parametrize("extra", [
    ("--advantage", "dr_grpo", "--loss-aggregation", "seq_mean_token_sum_norm", "--scale-rewards", "none"),
    ("--advantage", "grpo", "--scale-rewards", "batch", "--loss-aggregation", "token_mean",
     "--epsilon-high", "0.28", "--mask-truncated", "--overlong-buffer", "2"),
    ("--advantage", "reinforce_pp", "--kl-in", "reward"),
    ("--advantage", "reinforce_pp_baseline", "--kl-in", "reward", "--ppo-epochs", "2",
     "--mini-batch-size", "8", "--micro-batch-size", "4"),
    ("--importance-sampling", "sequence", "--kl-estimator", "k2", "--ppo-epochs", "2"),
])
def test_every_option_runs(extra, task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, "grpo", out, "--max-steps", "2", *extra)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["policy/loss"] is not None for r in rows)


def test_micro_batches_give_the_update_of_the_whole_minibatch(task, tmp_path):
    """Per-response aggregation: micro-batches weighted by their share of the responses."""
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    for out, extra in ((whole, ()), (micro, ("--micro-batch-size", "4"))):
        assert main(_args(task, "grpo", out, "--max-steps", "2", *extra)) == 0
    for a, b in zip(read_metrics(whole / "metrics.jsonl"), read_metrics(micro / "metrics.jsonl")):
        for key in ("policy/loss", "policy/grad_norm", "objective/kl", "reward_fn/vowels/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_resume_repeats_the_uninterrupted_run(task, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(task, "grpo", full, "--max-steps", "4")) == 0
    assert main(_args(task, "grpo", cut, "--max-steps", "2", "--save-every", "1")) == 0
    (cut / "tether_run.json").unlink()  # as if it had stopped after its second checkpoint
    assert main(_args(task, "grpo", cut, "--max-steps", "4", "--resume")) == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    keys = [k for k in a[0] if not k.startswith("timing/") and k != "memory/rss_mb"]  # measured
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]


def test_groups_without_reward_variance_teach_nothing_and_are_reported(task, tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    logger = logging.getLogger("tether")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        assert main(_args(task, "grpo", out, "--max-steps", "3", reward="constant")) == 0
    finally:
        logger.removeHandler(handler)
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["objective/frac_reward_zero_std"] == 1.0 for r in rows)
    # no advantage, no KL at the first step: the policy does not move
    assert rows[0]["policy/loss"] == pytest.approx(0.0, abs=1e-7)
    assert any("no_learning_signal" in m for m in seen)


def test_usage_errors(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(task, "grpo", out, "--num-generations", "1")) == 2
    assert main(_args(task, "grpo", out, "--advantage", "reinforce_pp")) == 2  # KL in the loss
    assert "--kl-in reward" in capsys.readouterr().err
    assert main(["grpo", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--num-generations", "--advantage", "--scale-rewards", "--loss-aggregation", "--kl-in",
                 "--kl-estimator", "--epsilon-high", "--importance-sampling", "--mask-truncated",
                 "--overlong-buffer", "--overlong-penalty", "--reward-fn"):
        assert flag in text, flag
    assert "--vf-coef" not in text and "--critic" not in text
    assert not out.exists()


def test_two_processes_match_one_process(task, tmp_path):
    """DDP over gloo, 2 prompts x G per process against 4 x G in one process: the same groups
    and sampling noise per row, advantages from each group (or the batch std across
    processes), losses and statistics averaged over both."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from tether.data.tokenize import encode_prompt

    root, policy, _ = task
    tok = AutoTokenizer.from_pretrained(policy)
    names = ["Lily", "Tom", "Sue", "Ben", "Max", "Ann", "Tim", "Jack", "Amy", "Sam"]
    texts = [f"Once upon a time, {n} saw a" for n in names]
    lengths = [len(encode_prompt(tok, t)) for t in texts]
    same = [t for t, n in zip(texts, lengths) if n == max(set(lengths), key=lengths.count)]
    assert len(same) >= 2  # equal lengths: no prompt padding, which would differ per batch
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in (same * 8)[:16]])
    one, two = tmp_path / "one", tmp_path / "two"

    def args(out, batch):
        a = _args((root, policy, prompts), "grpo", out, "--max-steps", "3", "--scale-rewards", "batch")
        a[a.index("--batch-size") + 1] = str(batch)
        return a

    assert main(args(one, 4)) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + 350) % 500), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tether", *args(two, 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("objective/kl", "objective/rm_score", "objective/frac_reward_zero_std",
                    "policy/loss", "policy/grad_norm", "policy/approx_kl", "response/length",
                    "reward_fn/vowels/mean", "objective/rm_score_std", "response/distinct_2"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


def test_dynamic_sampling_refills_the_batch_with_groups_that_have_a_signal(task, tmp_path):
    """A reward that is flat for most prompts (it pays only completions of the first prompt's
    group that contain a vowel-heavy piece, else 0): dynamic sampling drops the flat groups and
    samples more prompts until the batch is full or the cap is spent."""
    root, policy, prompts = task
    (root / "sparse.py").write_text(
        "def sparse(prompts, completions, **_):\n"
        "    return [float(sum(ch in 'aeiou' for ch in c) >= 4) for c in completions]\n")
    out = tmp_path / "run"
    args = _args(task, "grpo", out, "--max-steps", "2", "--dynamic-sampling", "--max-resample-rounds", "2")
    args[args.index("--reward-fn") + 1] = f"{root / 'sparse.py'}:sparse"
    assert main(args) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all("response/resample_rounds" in r for r in rows)
    assert all(0 <= r["response/resample_rounds"] <= 2 for r in rows)
    # rounds are used exactly when the first draw had flat groups
    assert all((r["response/resample_rounds"] > 0) == (r["objective/frac_reward_zero_std"] > 0) for r in rows)
