"""The rollout engine: left padding, sampling, stopping at the first EOS, logprobs, RM inputs."""

from types import SimpleNamespace

import pytest
import torch

from tether.models.critic import Actor, Critic, new_value_head
from tether.ops.logprobs import token_logprobs
from tether.rollout.generate import (HFGenerator, KVCacheSampler, SamplingParams, finish_responses,
                                     left_pad, sample_next_token)
from tether.rollout.score import Reference, reward_model_inputs
from tether.rollout.stats import distinct_ngrams, explained_variance
from tether.rollout.types import Rollout

PAD = 0


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM that emits a fixed token per row and step (its 'cache' is the step)."""

    def __init__(self, script, vocab=16):
        super().__init__()
        self.script, self.vocab, self.calls = torch.tensor(script), vocab, 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True,
                logits_to_keep=0):
        self.calls += 1
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -1e4)
        logits[torch.arange(input_ids.shape[0]), -1, self.script[:, step]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=step)


def test_left_pad_puts_every_prompt_at_the_right_edge():
    ids, mask = left_pad([[5, 6, 7], [8]], PAD)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sampler_cuts_at_the_first_of_several_eos_ids_and_masks_the_rest():
    # row 0 ends with eos 2 at step 2, row 1 with eos 1 at step 1 (then "emits" eos 2 again), row 2 never
    script = [[5, 6, 2, 7, 8, 9], [5, 1, 2, 7, 2, 9], [5, 6, 7, 8, 9, 10]]
    model = ScriptedLM(script)
    params = SamplingParams(6, eos_token_ids=(2, 1), pad_token_id=PAD)
    ids, mask = left_pad([[3, 4], [3], [4, 4, 4]], PAD)
    r = KVCacheSampler(model, params).generate(ids, mask, torch.Generator().manual_seed(0))
    assert r.response_ids.tolist() == [[5, 6, 2, 0, 0, 0], [5, 1, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6]
    assert r.ended.tolist() == [True, True, False]
    assert model.calls == 6  # prefill + 5 decode steps: no step after the last token


def test_sampler_stops_as_soon_as_every_row_has_ended():
    model = ScriptedLM([[5, 2, 9, 9, 9, 9, 9, 9], [1, 9, 9, 9, 9, 9, 9, 9]])
    params = SamplingParams(8, eos_token_ids=(2, 1), pad_token_id=PAD)
    ids, mask = left_pad([[3], [4]], PAD)
    r = KVCacheSampler(model, params).generate(ids, mask, torch.Generator())
    assert model.calls == 2  # prefill -> token 0, one decode step -> token 1, then both are done
    assert r.response_ids.shape == (2, 8)  # still padded to the response length
    assert r.response_ids.tolist() == [[5, 2] + [0] * 6, [1] + [0] * 7]
    assert r.response_mask.sum(-1).tolist() == [2, 1]


def test_finish_responses_without_eos_ids_keeps_everything():
    sampled = torch.tensor([[2, 2, 3]])
    r = finish_responses(torch.tensor([[4]]), torch.tensor([[1]]), sampled,
                         SamplingParams(3, eos_token_ids=(), pad_token_id=PAD))
    assert r.response_mask.tolist() == [[1, 1, 1]] and r.ended.tolist() == [False]


def test_sample_next_token_follows_the_distribution_and_truncation():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).expand(20000, 4)
    rng = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, SamplingParams(1), rng)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015)
    top_k = sample_next_token(logits, SamplingParams(1, top_k=2), rng)
    assert set(top_k.tolist()) == {2, 3}
    top_p = sample_next_token(logits, SamplingParams(1, top_p=0.65), rng)  # 0.4 + 0.3 covers it
    assert set(top_p.tolist()) == {2, 3}
    hot = sample_next_token(logits, SamplingParams(1, temperature=0.05), rng)
    assert (hot == 3).float().mean() > 0.99


def _tiny(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    from tether.models.load import eos_token_ids, load_tokenizer

    tok = load_tokenizer(str(tiny_models[arch]))
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation="sdpa").eval()
    return tok, model, tuple(eos_token_ids(tok, model))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_sampling_matches_hf_generate(tiny_models, arch):
    tok, model, eos = _tiny(tiny_models, arch)
    rows = [tok("the cat sat on")["input_ids"], tok("a")["input_ids"], tok("the big red dog ran")["input_ids"]]
    ids, mask = left_pad(rows, tok.pad_token_id)
    params = SamplingParams(10, top_k=1, eos_token_ids=eos, pad_token_id=tok.pad_token_id)
    ours = KVCacheSampler(model, params).generate(ids, mask, torch.Generator())
    hf = HFGenerator(model, params).generate(ids, mask, torch.Generator())
    assert torch.equal(ours.response_ids, hf.response_ids)
    for row, prompt in enumerate(rows):  # and each row alone, unpadded
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                               eos_token_id=list(eos), pad_token_id=tok.pad_token_id)[0, len(prompt):]
        n = int(ours.response_mask[row].sum())
        assert ours.response_ids[row, :n].tolist() == alone[:n].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_temperature_scaled_logprobs_equal_a_plain_recomputation(tiny_models, arch):
    tok, model, eos = _tiny(tiny_models, arch)
    T = 0.7
    rows = [tok("the cat sat on")["input_ids"], tok("a")["input_ids"]]
    ids, mask = left_pad(rows, tok.pad_token_id)
    rollout = KVCacheSampler(model, SamplingParams(8, T, eos_token_ids=eos, pad_token_id=tok.pad_token_id)
                             ).generate(ids, mask, torch.Generator().manual_seed(3))
    seqs = rollout.sequences()
    logits, values = Actor(model, new_value_head(model))(seqs.input_ids, seqs.attention_mask,
                                                          seqs.position_ids, 8)
    ours = token_logprobs(logits, seqs.response_ids, T)
    ref = Reference(model).logprobs(seqs, T)
    assert values.shape == (2, 8) and torch.equal(values, torch.zeros(2, 8))  # zero-initialised head
    for row, prompt in enumerate(rows):
        n = int(rollout.response_mask[row].sum())
        full = torch.tensor([prompt + rollout.response_ids[row, :n].tolist()])
        with torch.no_grad():
            plain = torch.log_softmax(model(full).logits[0, len(prompt) - 1:-1] / T, -1)
        expected = plain[torch.arange(n), rollout.response_ids[row, :n]]
        torch.testing.assert_close(ours[row, :n], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref[row, :n], expected, atol=1e-5, rtol=1e-5)


def test_reward_model_inputs_drop_the_eos_and_right_align():
    r = Rollout(prompt_ids=torch.tensor([[0, 7, 8], [9, 9, 9]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                response_ids=torch.tensor([[5, 2, 0, 0], [6, 6, 6, 6]]),
                response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), ended=torch.tensor([True, False]))
    ids, mask = reward_model_inputs(r.sequences(), eos_token_ids=(2, 1), pad_token_id=PAD)
    assert ids.tolist() == [[7, 8, 5, 0, 0, 0, 0], [9, 9, 9, 6, 6, 6, 6]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]


def test_rm_scores_of_rollouts_equal_plain_hf_scores(tiny_models):
    from transformers import AutoModelForSequenceClassification

    from tether.models.reward import init_reward_model
    from tether.rollout.score import RewardScorer

    tok, model, eos = _tiny(tiny_models, "llama")
    rm = init_reward_model(str(tiny_models["llama"]), pad_token_id=tok.pad_token_id).eval()
    rows = [tok("the cat")["input_ids"], tok("a dog ran to the park")["input_ids"]]
    ids, mask = left_pad(rows, tok.pad_token_id)
    r = Rollout(ids, mask, torch.tensor([[11, 12, eos[0], 0], [13, 14, 15, 16]]),
                torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([True, False]))
    ours = RewardScorer(rm, eos, tok.pad_token_id).score(r.sequences()).scores
    assert isinstance(rm, AutoModelForSequenceClassification._model_mapping[type(rm.config)])
    for row, response in enumerate([[11, 12], [13, 14, 15, 16]]):  # no EOS, no padding
        with torch.no_grad():
            plain = rm(torch.tensor([rows[row] + response])).logits[0, 0]
        torch.testing.assert_close(ours[row], plain, atol=1e-5, rtol=1e-5)


def test_a_response_whose_ids_its_text_does_not_give_back_is_scored_on_its_text(tiny_models):
    """Byte-level BPE (the tiny GPT-2's, trained here): the token for the lone byte 0xC3 is half
    of a UTF-8 character, so its text is U+FFFD, which encodes to three other tokens. The RM
    must score what the text encodes to (the ids a user's saved sample gives), not the raw ids,
    and the rollout is flagged; a canonical rollout is scored on its own ids."""
    from tether.models.reward import init_reward_model
    from tether.rollout.score import RewardScorer

    tok, _, eos = _tiny(tiny_models, "gpt2")
    rm = init_reward_model(str(tiny_models["gpt2"]), pad_token_id=tok.pad_token_id, seed=5).eval()
    half = tok.convert_tokens_to_ids("\u00c3")  # byte 0xC3 in GPT-2's byte alphabet
    assert tok.decode([half]) == "\ufffd"
    canonical = tok(" the cat", add_special_tokens=False)["input_ids"]
    hacked = canonical[:1] + [half, half]
    text = tok.decode(hacked)
    again = tok(text, add_special_tokens=False)["input_ids"]
    assert again != hacked
    prompt = tok("a dog ran to the park")["input_ids"]
    T = max(len(canonical), len(hacked))
    responses = [r + [eos[0]] + [PAD] * (T - len(r)) for r in (canonical, hacked)]
    masks = [[1] * (len(r) + 1) + [0] * (T - len(r)) for r in (canonical, hacked)]
    ids, mask = left_pad([prompt, prompt], tok.pad_token_id)
    r = Rollout(ids, mask, torch.tensor(responses), torch.tensor(masks), torch.tensor([True, True]))
    out = RewardScorer(rm, eos, tok.pad_token_id, tok).score(r.sequences())
    assert out.noncanonical.tolist() == [False, True]

    def plain(response):
        with torch.no_grad():
            return rm(torch.tensor([prompt + response])).logits[0, 0]

    torch.testing.assert_close(out.scores[0], plain(canonical), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores[1], plain(again), atol=1e-5, rtol=1e-5)
    assert abs(float(out.scores[1] - plain(hacked))) > 1e-3  # the raw ids score otherwise


def test_separate_critic_reads_the_rm_head_at_every_response_position(tiny_models):
    from tether.models.reward import init_reward_model, per_token_scalars

    tok, _, _ = _tiny(tiny_models, "llama")
    rm = init_reward_model(str(tiny_models["llama"]), pad_token_id=tok.pad_token_id).eval()
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    mask = torch.ones_like(ids)
    values = Critic(rm)(ids, mask, torch.arange(5)[None], 2)
    every = per_token_scalars(rm, ids, mask)
    torch.testing.assert_close(values, every[:, 2:4])  # V(x, y_<t) sits where y_t is predicted


def test_distinct_ngrams_and_explained_variance_by_hand():
    tokens = torch.tensor([[1, 2, 1, 2], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # bigrams: (1,2) (2,1) (1,2) | (1,2) (2,3) -> 3 unique of 5
    assert distinct_ngrams(tokens, mask, 2).item() == pytest.approx(3 / 5)
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    full = torch.ones(1, 4)
    assert explained_variance(returns, returns, full).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.5), returns, full).item() == pytest.approx(0.0)
    assert explained_variance(-returns, returns, full).item() < 0


def test_each_noise_shard_draws_what_the_whole_batch_draws_for_its_rows():
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(0))
    whole = sample_next_token(logits, SamplingParams(1), torch.Generator().manual_seed(5))
    parts = [sample_next_token(logits[4 * k:4 * k + 4], SamplingParams(1, noise_shard=(k, 3)),
                               torch.Generator().manual_seed(5)) for k in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    # without the shard, the second process would reuse the first one's noise
    alone = sample_next_token(logits[4:8], SamplingParams(1), torch.Generator().manual_seed(5))
    assert not torch.equal(alone, whole[4:8])


def test_noise_rows_pick_any_window_of_a_batch_spread_over_processes():
    """A short last batch of 7 rows over processes holding 4 rows each: 4 on the first, 3 on
    the second. Each draws the whole batch's noise for its own window."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(1))
    whole = sample_next_token(logits, SamplingParams(1), torch.Generator().manual_seed(9))
    first = sample_next_token(logits[:4], SamplingParams(1), torch.Generator().manual_seed(9),
                              noise_rows=(0, 7))
    second = sample_next_token(logits[4:], SamplingParams(1), torch.Generator().manual_seed(9),
                               noise_rows=(4, 7))
    assert torch.equal(torch.cat([first, second]), whole)
    # the shard rule would read the second process's 3 rows as rows 3..5 of a batch of 6
    shard = sample_next_token(logits[4:], SamplingParams(1, noise_shard=(1, 2)),
                              torch.Generator().manual_seed(9))
    assert not torch.equal(shard, whole[4:])
    with pytest.raises(ValueError, match="outside a batch of 7"):
        sample_next_token(logits[4:], SamplingParams(1), torch.Generator(), noise_rows=(5, 7))
