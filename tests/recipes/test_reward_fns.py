"""Python reward functions (`--reward-fn file.py:name`): loading, weighting, None, the errors that
name the function and the row, and PPO trained on a function alone or added to an RM."""

import math
import re

import pytest
import torch

from tether.cli import main
from tether.errors import ConfigError, TrainingError
from tether.rollout.reward_fns import RewardFunctions, function_metrics, load_reward_fn
from tether.training.metrics import read_metrics

from conftest import write_jsonl

FUNCTIONS = '''
CALLS = []

def vowels(prompts, completions, **columns):
    """The share of vowels among the letters of a completion: learnable by a tiny model."""
    CALLS.append(sorted(columns))
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out

def answer_match(prompts, completions, answer, **_):
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

def answer_where_given(prompts, completions, answer, **_):
    return [(1.0 if a in c else 0.0) if a else None for c, a in zip(completions, answer)]

def only_first(prompts, completions, **_):
    return [1.0] + [None] * (len(completions) - 1)

def nothing(prompts, completions, **_):
    return [None] * len(completions)

def trl_chat(prompts, completions, **_):
    """Written for TRL's conversational form: messages in, one assistant message out."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts[0]
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)
    out = [float(p[-1]["content"].split()[-1] in c[0]["content"]) for p, c in zip(prompts, completions)]
    prompts[0].clear()  # a function that changes its arguments
    completions[0][0]["content"] = "changed"
    return out

def step_and_ids(prompts, completions, completion_ids, trainer_state, answer):
    """TRL's extra keywords, taken by name: the reward is the number of iterations done so far."""
    assert len(completion_ids) == len(completions) and all(ids for ids in completion_ids)
    assert all(isinstance(t, int) for ids in completion_ids for t in ids)
    return [float(trainer_state.global_step)] * len(completions)

def plain_signature(prompts, completions, answer):
    return [1.0] * len(completions)

async def awaited_vowels(prompts, completions, **kwargs):
    assert "completion_ids" in kwargs and "trainer_state" in kwargs
    return vowels(prompts, completions)

def broken(prompts, completions, **_):
    raise KeyError("no such field")

def short(prompts, completions, **_):
    return [0.0]

def not_finite(prompts, completions, **_):
    return [0.0] * (len(completions) - 1) + [float("nan")]
'''


@pytest.fixture
def fns(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(FUNCTIONS)
    return path


def test_functions_are_weighted_and_none_means_not_applicable(fns):
    rf = RewardFunctions.from_config([f"{fns}:answer_match", f"{fns}:only_first"], [2.0, 0.5])
    total, per_fn = rf(["p1", "p2"], ["the cat", "a dog"], {"answer": ["cat", "cow"]},
                       ["f:1", "f:2"])
    assert total == [2.0 * 1 + 0.5 * 1, 2.0 * 0]
    assert per_fn == {"answer_match": [1.0, 0.0], "only_first": [1.0, None]}
    metrics = function_metrics(per_fn)
    assert metrics["reward_fn/answer_match/mean"] == 0.5
    assert metrics["reward_fn/answer_match/std"] == pytest.approx(math.sqrt(0.5))
    assert metrics["reward_fn/only_first/applied"] == 0.5


@pytest.mark.parametrize("name,needle", [
    ("broken", "raised KeyError"), ("short", "returned 1 value(s) for 2"),
    ("not_finite", "returned nan for f:2 (completion 'b')"), ("nothing", "no reward function applies to f:1"),
])
def test_a_function_that_misbehaves_is_named_with_the_row(fns, name, needle):
    rf = RewardFunctions.from_config([f"{fns}:{name}"], [])
    with pytest.raises(TrainingError, match=re.escape(needle)) as err:
        rf(["p1", "p2"], ["a", "b"], {}, ["f:1", "f:2"])
    assert name in str(err.value) or "no reward function" in str(err.value)


def test_a_row_no_function_applies_to_keeps_the_reward_models_score_alone(fns):
    rf = RewardFunctions.from_config([f"{fns}:only_first"], [])
    total, per_fn = rf(["p1", "p2"], ["a", "b"], {}, ["f:1", "f:2"], scored_elsewhere=True)
    assert total == [1.0, 0.0] and per_fn == {"only_first": [1.0, None]}
    with pytest.raises(TrainingError, match=re.escape("no reward function applies to f:2")):
        rf(["p1", "p2"], ["a", "b"], {}, ["f:1", "f:2"])  # no reward model: nothing scores f:2


def test_conversational_prompts_reach_functions_in_trls_form_each_function_its_own_copy(fns):
    rf = RewardFunctions.from_config([f"{fns}:trl_chat", f"{fns}:trl_chat"], [])
    chats = [[{"role": "user", "content": "say cat"}], [{"role": "user", "content": "say dog"}]]
    total, per_fn = rf(["<rendered 1>", "<rendered 2>"], ["a cat", "a cow"], {}, ["f:1", "f:2"],
                       chats=chats)
    assert per_fn["trl_chat"] == per_fn["trl_chat_2"] == [1.0, 0.0]  # the second saw no change
    assert total == [2.0, 0.0]
    assert chats[0] == [{"role": "user", "content": "say cat"}]  # the caller's lists untouched
    # a batch that is not all messages gets the texts
    _, plain = RewardFunctions.from_config([f"{fns}:vowels"], [])(
        ["p1", "p2"], ["a cat", "a cow"], {}, ["f:1", "f:2"], chats=[chats[0], None])
    assert plain["vowels"] == [0.5, 0.5]


@pytest.mark.parametrize("column", ["messages", "prompt"])  # "prompt": TRL's conversational form
def test_grpo_on_chat_prompts_calls_a_trl_conversational_reward_function(column, tiny_models, fns, tmp_path):
    rows = [{column: [{"role": "user", "content": f"name a {w}"}]} for w in ("cat", "dog")] * 4
    prompts = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    assert main(["grpo", "--policy", str(tiny_models["qwen2"]), "--prompts", str(prompts),
                 "--output-dir", str(out), "--reward-fn", f"{fns}:trl_chat", "--batch-size", "2",
                 "--num-generations", "4", "--response-length", "4", "--max-steps", "1",
                 "--no-progress", "--no-tensorboard"]) == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["reward_fn/trl_chat/applied"] == 1.0


def test_trls_extra_keywords_reach_only_the_functions_that_take_them(fns):
    from tether.rollout.reward_fns import taken_by, trl_trainer_state

    extras = {"completion_ids": [[5, 2], [7]], "trainer_state": trl_trainer_state(3, 10)}
    rf = RewardFunctions.from_config([f"{fns}:step_and_ids", f"{fns}:plain_signature"], [])
    total, per_fn = rf(["p1", "p2"], ["a", "b"], {"answer": ["x", "y"]}, ["f:1", "f:2"], extras=extras)
    assert per_fn == {"step_and_ids": [2.0, 2.0], "plain_signature": [1.0, 1.0]}
    assert taken_by(rf.functions[1], extras) == {}
    assert set(taken_by(load_reward_fn(f"{fns}:vowels"), extras)) == {"completion_ids", "trainer_state"}
    assert taken_by(load_reward_fn(f"{fns}:vowels"), extras, exclude={"completion_ids": []}) == {
        "trainer_state": extras["trainer_state"]}  # a data column of that name wins


def test_an_async_reward_function_is_awaited_also_under_a_running_event_loop(fns):
    import asyncio

    rf = RewardFunctions.from_config([f"{fns}:awaited_vowels"], [])
    extras = {"completion_ids": [[1], [2]], "trainer_state": None}
    expected = {"awaited_vowels": [0.5, 0.5]}
    assert rf(["p", "p"], ["a cat", "a cow"], {}, ["f:1", "f:2"], extras=extras)[1] == expected

    async def inside_a_loop():
        return rf(["p", "p"], ["a cat", "a cow"], {}, ["f:1", "f:2"], extras=extras)[1]

    assert asyncio.run(inside_a_loop()) == expected


def test_grpo_gives_functions_the_iterations_done_so_far_as_trainer_state(tiny_models, fns, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tom saw a", "answer": "Tom"}] * 4)
    out = tmp_path / "run"
    assert main(["grpo", "--policy", str(tiny_models["llama"]), "--prompts", str(prompts),
                 "--output-dir", str(out), "--reward-fn", f"{fns}:step_and_ids,{fns}:awaited_vowels",
                 "--batch-size", "2", "--num-generations", "2", "--response-length", "3",
                 "--max-steps", "3", "--no-progress", "--no-tensorboard"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["reward_fn/step_and_ids/mean"] for r in rows] == [0.0, 1.0, 2.0]
    assert all(0.0 <= r["reward_fn/awaited_vowels/mean"] <= 1.0 for r in rows)


@pytest.mark.parametrize("spec,needle", [
    ("nocolon.py", "path/to/file.py:function_name"), ("missing.py:f", "is not a file"),
    ("{fns}:absent", "has no function 'absent'"),
])
def test_a_reward_function_that_cannot_be_loaded_is_a_usage_error(fns, spec, needle):
    with pytest.raises(ConfigError, match=needle):
        load_reward_fn(spec.format(fns=fns))


def _ppo(policy, prompts, out, *extra):
    return ["ppo", "--policy", str(policy), "--prompts", str(prompts), "--output-dir", str(out),
            "--critic", "head", "--batch-size", "16", "--response-length", "6", "--lr", "1e-2",
            "--value-lr", "1e-2", "--temperature", "1.0", "--kl-coef", "0.01",
            "--missing-eos-penalty", "none", "--no-progress", "--no-tensorboard", *extra]


def test_ppo_learns_from_a_reward_function_alone(tiny_models, fns, tmp_path, one_torch_thread):
    """No reward model: the function's reward rises in the run and, from outside, on samples of
    the saved policy drawn with plain transformers and scored by the same function."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Once upon a time, {n} saw a", "answer": n}
                                                  for n in ["Lily", "Tom", "Sue", "Ben"] * 4])
    out = tmp_path / "run"
    assert main(_ppo(tiny_models["llama"], prompts, out, "--reward-fn", f"{fns}:vowels",
                     "--max-steps", "25")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all("reward_fn/vowels/mean" in r for r in rows)
    early = sum(r["reward_fn/vowels/mean"] for r in rows[:4]) / 4
    late = sum(r["reward_fn/vowels/mean"] for r in rows[-4:]) / 4
    assert late > early + 0.15, (early, late)

    import importlib.util

    spec = importlib.util.spec_from_file_location("rewards_outside", fns)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def outside(model_dir):
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ids = tok("Once upon a time, Tom saw a", return_tensors="pt").input_ids
        torch.manual_seed(0)
        sampled = model.generate(ids.repeat(64, 1), do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=6, pad_token_id=0)
        texts = tok.batch_decode(sampled[:, ids.shape[1]:], skip_special_tokens=True)
        return sum(module.vowels([""] * 64, texts)) / 64

    assert outside(out) > outside(tiny_models["llama"]) + 0.1


def test_functions_see_the_prompt_columns_and_add_to_the_rm(tiny_models, fns, tmp_path):
    from tether.models.load import load_tokenizer
    from tether.models.reward import init_reward_model

    rm = tmp_path / "rm"
    init_reward_model(str(tiny_models["llama"]), pad_token_id=0, seed=1).save_pretrained(rm)
    load_tokenizer(str(tiny_models["llama"])).save_pretrained(rm)
    # half the prompts have no answer: no function applies to their responses, which then get
    # the RM's score alone
    rows = [{"prompt": f"{n} saw a", "answer": n if k % 2 else "", "level": k}
            for k, n in enumerate(["Lily", "Tom"] * 4)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "run"
    args = _ppo(tiny_models["llama"], prompts, out, "--reward-model", rm, "--reward-fn",
                f"{fns}:answer_where_given,{fns}:nothing", "--reward-weights", "2,0.5",
                "--max-steps", "2", "--samples-per-iteration", "8", "--batch-size", "8")
    assert main([str(a) for a in args]) == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    assert {"reward_fn/answer_where_given/mean", "reward_fn/nothing/mean"} <= set(row)
    assert row["reward_fn/answer_where_given/applied"] == 0.5
    assert row["reward_fn/nothing/applied"] == 0.0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward_fn"] == [f"{fns}:answer_where_given", f"{fns}:nothing"]
    assert saved["reward_weights"] == [2.0, 0.5]


def test_a_function_that_raises_stops_ppo_with_the_last_checkpoint_intact(tiny_models, fns, tmp_path,
                                                                         capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tom saw a"}] * 8)
    out = tmp_path / "run"
    assert main(_ppo(tiny_models["llama"], prompts, out, "--reward-fn", f"{fns}:broken",
                     "--max-steps", "2")) == 1
    err = capsys.readouterr().err
    assert f"{fns}:broken raised KeyError" in err and "p.jsonl:" in err
    assert not (out / "model.safetensors").exists()  # nothing half-done was saved as the policy
    assert main(_ppo(tiny_models["llama"], prompts, tmp_path / "x", "--reward-fn", f"{fns}:vowels",
                     "--critic", "separate", "--max-steps", "1")) == 2
    assert "use --critic head" in capsys.readouterr().err
