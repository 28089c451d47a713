"""The multi-turn episode runner (tether.envs.episodes) with a scripted sampler: what goes into
the rollout (the policy's tokens trained, observations attended only), how observations are
encoded for plain and chat prompts, tool calls, limits, and environment errors."""

import time

import pytest
import torch

from tether.envs.api import EnvError, EnvSpec, checked_step
from tether.envs.episodes import EpisodeLimits, EpisodeRunner, ObservationEncoder, Turns, cut_at_stop
from tether.envs.tools import parse_calls, tool_env


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["qwen2"])  # byte-level BPE with ChatML


def scripted(tok, turns):
    """A sampler that writes turns[t][row] (text) at turn t, ending each with EOS unless the
    text ends with '…' (then it is cut as if it ran out of tokens)."""
    calls = []

    def sample(contexts, max_new, turn):
        calls.append((len(contexts), max_new, turn))
        tokens, ended = [], []
        for k in range(len(contexts)):
            text = turns[turn][k] if k < len(turns[turn]) else "x"
            cut = text.endswith("…")
            ids = tok(text.rstrip("…"), add_special_tokens=False)["input_ids"]
            ids = ids if cut else ids + [tok.eos_token_id]
            tokens.append(ids[:max_new])
            ended.append(not cut and len(ids) <= max_new)
        return Turns(tokens, ended)

    sample.calls = calls
    return sample


class Counter:
    """Observation 'n=<turn>' after each turn; done at the third; reward 1 per turn."""

    def reset(self, row):
        self.n = 0
        return None

    def step(self, action):
        self.n += 1
        return (f" n={self.n}", 1.0, self.n >= 3)


def runner(tok, env, **limits):
    base = dict(max_turns=4, max_total_length=200, turn_length=30)
    return EpisodeRunner([EnvSpec("env", env)], tok, [tok.eos_token_id], tok.pad_token_id or 0,
                         EpisodeLimits(**{**base, **limits}))


def prompt_ids(tok, n=2):
    return [tok("once upon a time", add_special_tokens=False)["input_ids"] for _ in range(n)]


def test_only_the_policy_tokens_are_trained_and_observations_are_attended(tok):
    sample = scripted(tok, [["a dog", "the cat"], ["sat", "ran"], ["good", "bad"]])
    r = runner(tok, Counter)
    out = r.run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [False, False], sample)
    roll = out.rollout
    for b, ep in enumerate(out.episodes):
        assert ep.turns == 3 and ep.done and ep.reward == 3.0
        ids = roll.response_ids[b][roll.response_attention[b].bool()].tolist()
        trained = roll.response_ids[b][roll.response_mask[b].bool()].tolist()
        text = tok.decode(ids)
        assert " n=1" in text and " n=2" in text and " n=3" not in text  # done: no last observation
        assert " n=" not in tok.decode(trained)  # observations are never trained
        assert tok.decode(trained).count(tok.eos_token) == 3  # each turn's EOS is the policy's
    assert roll.ended.all()
    seqs = roll.sequences()
    assert torch.equal(seqs.attention_mask[:, seqs.n_prompt:], roll.response_attention)
    assert torch.equal(seqs.response_mask, roll.response_mask)
    m = out.metrics()
    assert m["env/turns"] == 3 and m["env/reward"] == 3 and 0 < m["env/observation_token_frac"] < 1
    r.close()


def test_max_turns_and_max_total_length_truncate(tok):
    sample = scripted(tok, [["a", "b"]] * 4)
    out = runner(tok, Counter, max_turns=2).run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [False] * 2, sample)
    assert all(ep.truncated and ep.turns == 2 for ep in out.episodes) and not out.rollout.ended.any()
    long = scripted(tok, [["a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 2] * 4)
    out = runner(tok, Counter, max_total_length=12).run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [False] * 2, long)
    assert all(ep.truncated for ep in out.episodes)
    assert out.rollout.response_attention.sum(-1).max() <= 12


def test_a_turn_cut_by_its_token_limit_still_reaches_the_environment(tok):
    sample = scripted(tok, [["a dog…"] * 2, ["b"] * 2, ["c"] * 2])
    out = runner(tok, Counter).run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [False] * 2, sample)
    assert all(ep.turns == 3 and ep.done for ep in out.episodes)


def test_chat_observations_are_rendered_by_the_template(tok):
    class Tool:
        observation_role = "tool"

        def reset(self, row):
            return None

        def step(self, action):
            return ("42", None, "42" in action)

    enc = ObservationEncoder(tok, True, "tool", [tok.eos_token_id])
    text = tok.decode(enc.encode("42", after_eos=True))
    # ChatML: the assistant turn is closed, the tool message rendered, the next turn opened
    assert text.startswith("<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"), text
    assert tok.decode(enc.encode("42", after_eos=False)).startswith("<|im_end|>\n<|im_start|>tool\n42")
    sample = scripted(tok, [["ask"] * 2, ["it is 42"] * 2])
    out = runner(tok, Tool).run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [True] * 2, sample)
    full = tok.decode(out.rollout.response_ids[0][out.rollout.response_attention[0].bool()])
    assert "<|im_start|>tool\n42<|im_end|>" in full and all(ep.done for ep in out.episodes)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def test_tool_env_calls_functions_and_counts_errors(tok):
    Calc = tool_env([add], name="Calc")
    env = Calc()
    env.reset({})
    obs, reward, done, info = env.step('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>')
    assert obs == [{"role": "tool", "content": "5"}] and not done and info == {"tool_calls": 1, "tool_errors": 0}
    obs, _, _, info = env.step('<tool_call>{"name": "mul", "arguments": {}}</tool_call><tool_call>nope</tool_call>')
    assert info == {"tool_calls": 2, "tool_errors": 2} and "no tool named 'mul'" in obs[0]["content"]
    obs, _, _, info = env.step('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert info["tool_errors"] == 1 and "error" in obs[0]["content"]
    assert env.step("the answer is 5")[2] is True
    assert parse_calls("x <tool_call> {\"name\": \"f\"} </tool_call>")[0][0] == {"name": "f"}
    # in an episode: the stop string ends the turn, the result comes back in plain tags
    sample = scripted(tok, [['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call> ignored'] * 2,
                            ["5"] * 2])
    out = runner(tok, Calc, turn_length=150, max_total_length=400).run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [False] * 2, sample)
    text = out.transcripts[0]
    assert "ignored" not in text and "<tool_response>\n5\n</tool_response>" in text
    assert out.metrics()["env/tool_calls"] == 1 and out.metrics()["env/tool_call_rate"] == 1


def test_cut_at_stop(tok):
    ids = tok("abc</tool_call>def", add_special_tokens=False)["input_ids"]
    cut = cut_at_stop(tok, ids, ["</tool_call>"])
    assert tok.decode(cut).endswith("</tool_call>") and "def" not in tok.decode(cut)
    assert cut_at_stop(tok, ids, ["zzz"]) is None


class Raises:
    def reset(self, row):
        return None

    def step(self, action):
        raise RuntimeError("boom")


class Hangs:
    def reset(self, row):
        return None

    def step(self, action):
        time.sleep(5)
        return None, 0.0, True


class BadStep:
    def reset(self, row):
        return None

    def step(self, action):
        return "just a string"


@pytest.mark.parametrize("env, words", [(Raises, "raised RuntimeError: boom"), (Hangs, "took more than"),
                                        (BadStep, "step() returned 'just a string'")])
def test_environment_errors_name_the_environment_and_the_row_or_are_skipped(tok, env, words):
    sample = scripted(tok, [["a", "b"]] * 4)
    with pytest.raises(EnvError) as err:
        runner(tok, env, env_timeout=0.5).run(prompt_ids(tok), [{}, {}], ["p.jsonl:1", "p.jsonl:2"],
                                              [False] * 2, sample)
    assert "environment env on p.jsonl:1" in str(err.value) and words in str(err.value)
    out = runner(tok, env, env_timeout=0.5, env_errors="skip").run(
        prompt_ids(tok), [{}, {}], ["p.jsonl:1", "p.jsonl:2"], [False] * 2, sample)
    assert out.metrics()["env/skipped"] == 2 and out.skipped.all()
    assert out.rollout.response_mask.sum() == 0  # a skipped episode trains nothing


def test_checked_step_refuses_what_is_not_a_step():
    with pytest.raises(EnvError, match="reward nan"):
        checked_step(("x", float("nan"), False), "e", "r")
    with pytest.raises(EnvError, match="observation 3"):
        checked_step((3, None, False), "e", "r")
    step = checked_step(("x", 1, True, {"tool_calls": 1}), "e", "r")
    assert step.reward == 1.0 and step.done and step.info == {"tool_calls": 1}


def test_several_environments_need_an_env_column(tok):
    from tether.errors import DataError

    r = EpisodeRunner([EnvSpec("A", Counter), EnvSpec("B", Counter)], tok, [tok.eos_token_id], 0,
                      EpisodeLimits(2, 100, 10))
    sample = scripted(tok, [["a", "b"]] * 4)
    out = r.run(prompt_ids(tok), [{"env": "A"}, {"env": "B"}], ["p:1", "p:2"], [False] * 2, sample)
    assert [ep.env_name for ep in out.episodes] == ["A", "B"]
    with pytest.raises(DataError, match="`env` column"):
        r.run(prompt_ids(tok), [{}, {}], ["p:1", "p:2"], [False] * 2, sample)


def test_the_tools_reach_the_prompt_through_the_template_or_described(tok):
    import copy

    from tether.data.prompts import prompt_text
    from tether.envs.tools import tool_schema

    schema = [tool_schema(add)]
    chat = {"prompt": [{"role": "user", "content": "what is 2 + 3?"}]}
    text, messages = prompt_text(tok, chat, "p:1", schema)  # ChatML here has no tools section
    assert messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"]
    assert text.startswith("<|im_start|>system\nYou can call these tools:")
    plain, none = prompt_text(tok, {"prompt": "what is 2 + 3?"}, "p:1", schema)
    assert none is None and plain.endswith("what is 2 + 3?") and '"name": "add"' in plain
    with_section = copy.deepcopy(tok)
    with_section.chat_template = ("{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
                                  + tok.chat_template)
    text, messages = prompt_text(with_section, chat, "p:1", schema)
    assert text.startswith("TOOL add\n<|im_start|>user") and messages == chat["prompt"]


class Talk:
    """Three turns; the observation depends on the turn's text, so contexts differ per row."""

    stop = ("e",)  # turns are cut after their first "e": the cache holds tokens sampled past it

    def reset(self, row):
        self.n = 0
        return " hello"

    def step(self, action):
        self.n += 1
        return (f" you said {len(action)} things", float(len(action)), self.n >= 3)


def test_the_torch_sampler_keeps_its_cache_across_turns_and_samples_what_a_fresh_prefill_does(tiny_models,
                                                                                               monkeypatch):
    """The same episodes, the same noise: with the KV cache kept from turn to turn (TurnSession)
    and with every turn's context prefilled again, the samples are the same."""
    from transformers import AutoTokenizer

    from tether.envs.episodes import generator_turns
    from tether.models.load import load_causal_lm
    from tether.rollout.generate import KVCacheSampler, SamplingParams

    path = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(str(path)).eval()
    eos = (tok.eos_token_id,)
    sampler = KVCacheSampler(model, SamplingParams(8, 1.0, eos_token_ids=eos, pad_token_id=tok.pad_token_id or 0))
    assert sampler.session() is not None  # the fused step runs Llama
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("once upon a time", "the cat", "a dog ran",
                                                                       "she saw a big red ball")]

    def episodes():
        r = EpisodeRunner([EnvSpec("Talk", Talk)], tok, eos, tok.pad_token_id or 0, EpisodeLimits(3, 80, 8))
        rng = lambda turn: torch.Generator().manual_seed(100 + turn)  # noqa: E731
        out = r.run(prompts, [{}] * 4, [f"p:{i}" for i in range(4)], [False] * 4,
                    generator_turns(sampler, eos, tok.pad_token_id or 0, "cpu", rng))
        r.close()
        return out

    kept = episodes()
    assert max(ep.turns for ep in kept.episodes) >= 2  # there was a turn that continued the cache
    monkeypatch.setattr(KVCacheSampler, "session", lambda self: None)
    fresh = episodes()
    assert kept.transcripts == fresh.transcripts
    assert torch.equal(kept.rollout.response_ids, fresh.rollout.response_ids)
    assert torch.equal(kept.rollout.response_mask, fresh.rollout.response_mask)


def test_gymnasium_and_trl_shaped_environments_are_taken_as_they_are(tok):
    """A five-item step (terminated, truncated), an (observation, info) reset, and TRL's
    reset(**columns) need no adapter."""

    class GymLike:
        def reset(self, seed=None, options=None):  # positional: gets the row
            self.row = seed
            return " start", {}

        def step(self, action):
            return " ok", 0.5, False, True, {"tool_calls": 1}  # truncated ends it

    class TRLLike:
        def reset(self, **columns):
            self.answer = columns["answer"]
            return None

        def step(self, action):
            return None, float(self.answer == "yes"), True

    sample = scripted(tok, [["a", "b"]] * 4)
    out = runner(tok, GymLike).run(prompt_ids(tok), [{"k": 1}, {"k": 2}], ["p:1", "p:2"], [False] * 2, sample)
    assert all(ep.done and ep.reward == 0.5 and ep.tool_calls == 1 for ep in out.episodes)
    assert " start" in out.transcripts[0]
    out = runner(tok, TRLLike).run(prompt_ids(tok), [{"answer": "yes"}, {"answer": "no"}], ["p:1", "p:2"],
                                   [False] * 2, sample)
    assert [ep.reward for ep in out.episodes] == [1.0, 0.0]
