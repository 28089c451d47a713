"""`--env`: multi-turn episodes in `tether grpo`, `rloo` and `ppo` on a tiny Llama. The reward
rises in the run and when the saved policy plays the same environment from outside (plain
transformers, observations appended as text); every method and sampler runs; a resumed run
repeats the uninterrupted one; environment errors stop the run, or are skipped and counted."""

import json
import shutil

import pytest
import torch

from tether.cli import main
from tether.training.metrics import read_metrics

from conftest import write_jsonl

ENVS = '''
class Vowels:
    """Two turns: the first gets an observation, each is paid its share of vowels."""

    def reset(self, row):
        self.turn = 0
        return None

    def step(self, action):
        self.turn += 1
        reward = sum(ch in "aeiou" for ch in action) / max(len(action), 1)
        if self.turn == 2:
            return None, reward, True
        return " and then", reward, False, {"tool_calls": 1}


class Broken:
    def reset(self, row):
        return None

    def step(self, action):
        raise ValueError("the environment broke")
'''


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny models run faster on one thread (see conftest)."""


@pytest.fixture(scope="module")
def task(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("env_task")
    (root / "envs.py").write_text(ENVS)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Once upon a time, {n} saw a"}
                                                    for n in ["Lily", "Tom", "Sue", "Ben"] * 4])
    return root, tiny_models["llama"], prompts


def _args(task, stage, out, *extra, env="Vowels"):
    root, policy, prompts = task
    group = ("--num-generations", "4") if stage != "ppo" else ("--critic", "head")
    return [stage, "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(out),
            "--env", f"{root / 'envs.py'}:{env}", "--batch-size", "4", *group, "--response-length", "6",
            "--lr", "1e-2", "--temperature", "1.0", "--no-progress", "--no-tensorboard", *extra]


def _outside(task, model_dir, n=48):
    """Mean episode reward of the saved policy playing Vowels with plain transformers: each
    turn sampled by generate(), the observation's text appended to the token ids."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("envs", task[0] / "envs.py")
    envs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(envs)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    total = 0.0
    for k in range(n):
        env = envs.Vowels()
        env.reset({})
        ids = tok(f"Once upon a time, {['Lily', 'Tom', 'Sue', 'Ben'][k % 4]} saw a", return_tensors="pt").input_ids
        done = False
        while not done:
            out = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=6,
                                 pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            turn = out[0, ids.shape[1]:]
            observation, reward, done, *_ = env.step(tok.decode(turn, skip_special_tokens=True))
            total += reward
            if not done:
                more = tok(observation, add_special_tokens=False, return_tensors="pt").input_ids
                ids = torch.cat([out, more], dim=1)
    return total / n


@pytest.mark.slow
def test_grpo_with_an_environment_raises_the_reward_in_the_run_and_from_outside(task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, "grpo", out, "--max-steps", "25")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    early = sum(r["env/reward"] for r in rows[:4]) / 4
    late = sum(r["env/reward"] for r in rows[-4:]) / 4
    assert late > early + 0.1, (early, late)
    assert _outside(task, out) > _outside(task, task[1]) + 0.1
    for r in rows:
        assert r["env/turns"] == 2 and r["env/tool_calls"] == 1 and 0 < r["env/observation_token_frac"] < 1
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert " and then" in sample["response"]  # the whole episode, its observation too


@pytest.mark.parametrize("stage, extra", [
    ("rloo", ()), ("ppo", ()), ("grpo", ("--generation-backend", "hf", "--mask-truncated")),
    ("grpo", ("--max-turns", "1", "--max-total-length", "6")),
])
def test_every_method_and_sampler_runs_with_an_environment(task, tmp_path, stage, extra):
    out = tmp_path / "run"
    assert main(_args(task, stage, out, "--max-steps", "2", *extra)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["policy/loss"] is not None for r in rows)
    turns = 1 if "--max-turns" in extra else 2
    assert all(r["env/turns"] == turns for r in rows)
    if "--max-turns" in extra:
        assert all(r["env/truncated_frac"] == 1.0 for r in rows)


def test_a_resumed_run_repeats_the_uninterrupted_one(task, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(_args(task, "grpo", whole, "--max-steps", "3", "--save-every", "2", "--keep-checkpoints", "3")) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    assert main(_args(task, "grpo", resumed, "--max-steps", "3", "--resume")) == 0
    a, b = read_metrics(whole / "metrics.jsonl")[-1], read_metrics(resumed / "metrics.jsonl")[-1]
    assert a["step"] == b["step"] == 3
    for key in ("env/reward", "objective/kl", "policy/loss", "env/observation_token_frac"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key


def test_an_environment_error_names_the_environment_and_the_row_or_is_skipped(task, tmp_path, capsys):
    assert main(_args(task, "grpo", tmp_path / "raise", "--max-steps", "1", env="Broken")) != 0
    err = capsys.readouterr().err
    assert "environment Broken on" in err and "prompts.jsonl:" in err and "the environment broke" in err
    out = tmp_path / "skip"
    assert main(_args(task, "grpo", out, "--max-steps", "2", "--env-errors", "skip", env="Broken")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["env/skipped"] == 16 for r in rows)


def test_dynamic_sampling_merges_rounds_of_episodes_of_different_lengths(task, tmp_path):
    out = tmp_path / "run"
    assert main(_args(task, "grpo", out, "--max-steps", "2", "--dynamic-sampling", "--max-resample-rounds", "2",
                      "--max-total-length", "40")) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_ppo_pays_each_turns_reward_at_the_end_of_its_turn(task, tmp_path):
    """The per-token rewards of PPO: each step's reward on its turn's last token, the KL penalty
    on every token; `objective/rm_score` holds the episodes' total."""
    import torch

    from tether.config import PPOConfig
    from tether.recipes.online.setup import build
    from tether.recipes.online.steps import PhaseClock, old_policy, sample_and_score

    root, policy, prompts = task
    cfg = PPOConfig(policy=str(policy), prompts=str(prompts), env=[f"{root / 'envs.py'}:Vowels"],
                    output_dir=str(tmp_path / "x"), batch_size=4, response_length=6, critic="head",
                    kl_coef=0.0, whiten_rewards=False, missing_eos_penalty=None, progress=False)
    parts = build(cfg)
    clock = PhaseClock(parts.device)
    sampled = sample_and_score(parts, 1, clock)
    prepared = parts.algorithm.experience(parts, parts.algorithm.shape(parts, 1, clock, sampled),
                                          old_policy(parts, sampled.seqs, clock))
    rewards, mask = prepared.experience.rewards, sampled.rollout.response_mask
    assert torch.allclose(rewards.sum(-1), sampled.scored.scores, atol=1e-6)
    first_turn_paid = 0
    for b in range(4):  # two turns: two rewarded tokens, each the last policy token of a turn
        paid = rewards[b].nonzero().flatten().tolist()
        own = mask[b].nonzero().flatten().tolist()
        ends = [t for t in own if t + 1 not in own]  # the last token of each turn
        assert len(ends) == 2 and set(paid) <= set(ends)
        first_turn_paid += bool(rewards[b, ends[0]] != 0)
    assert first_turn_paid >= 2  # (a turn without a vowel is paid 0)


def test_held_out_episodes_are_evaluated(task, tmp_path):
    out = tmp_path / "run"
    root, _, prompts = task
    assert main(_args(task, "grpo", out, "--max-steps", "1", "--eval-prompts", str(prompts))) == 0
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert 0 < row["eval/env_reward"] < 2 and row["eval/tool_call_rate"] == 1.0
    assert row["eval/rm_score"] == pytest.approx(row["eval/env_reward"])  # no RM, no function: the env's


@pytest.mark.parametrize("arch", ["gpt2", "neox", "qwen2"])
def test_episodes_run_on_other_architectures(task, tiny_models, tmp_path, arch):
    """GPT-2 (absolute positions: the observations take theirs), GPT-NeoX and Qwen2 (its torch
    sampler keeps the cache across turns through the fused step) run episodes end to end."""
    root, _, prompts = task
    out = tmp_path / "run"
    args = _args(task, "grpo", out, "--max-steps", "2")
    args[args.index("--policy") + 1] = str(tiny_models[arch])
    assert main(args) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all(r["env/turns"] == 2 and r["policy/loss"] is not None for r in rows)


def test_chat_prompts_take_observations_as_messages_of_the_template(task, tiny_models, tmp_path):
    root, _, _ = task
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"tell {n} a story"}]}
                                                   for n in ["Lily", "Tom"] * 4])
    out = tmp_path / "run"
    args = _args(task, "grpo", out, "--max-steps", "1", "--max-total-length", "80")
    args[args.index("--policy") + 1] = str(tiny_models["qwen2"])
    args[args.index("--prompts") + 1] = str(chats)
    assert main(args) == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["env/turns"] == 2 and row["env/observation_token_frac"] > 0
    # the observation " and then" went in as a user message, between the template's turn markers
    # (special tokens, left out of the text) and followed by the next generation prompt
    samples = [json.loads(line)["response"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all("user\n and then\nassistant\n" in s for s in samples), samples[0]


def test_a_reward_model_scores_the_whole_episode_and_adds_to_the_environments_reward(task, tmp_path):
    from conftest import story_rows

    root, policy, prompts = task
    rows = story_rows(8)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                    "rejected": rows[(i + 1) % 8]["completion"]}
                                                   for i, r in enumerate(rows)])
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(policy), "--data", str(pairs), "--output-dir", str(rm), "--max-steps", "2",
                 "--batch-size", "4", "--eval-fraction", "0", "--no-progress", "--no-tensorboard"]) == 0
    out = tmp_path / "run"
    assert main(_args(task, "grpo", out, "--max-steps", "1", "--reward-model", str(rm))) == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["objective/rm_score"] != pytest.approx(row["env/reward"])  # the RM's score is in it too
