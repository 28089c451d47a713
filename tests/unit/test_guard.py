"""The guard of the fast paths that re-implement transformers code (`tether.models.guard`): on an
unknown layer signature or a failed probe the model's own forward runs, and one warning says
why. On a release the tests were not run on, the probe alone decides (TETHER_FAST_PATHS=verified
restores stepping aside there), so every mutation below is also caught on an unknown release."""

import logging

import pytest
import torch

from tether.models import guard, prefix, tail
from tether.models.critic import response_logits
from tether.rollout import decode


GUARDS = (tail.GUARD, decode.GUARD, prefix.GUARD, prefix.GUARD_GRADIENTS)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv("TETHER_FAST_PATHS", raising=False)
    for g in GUARDS:
        g.forget()
    yield
    for g in GUARDS:
        g.forget()


@pytest.fixture(params=["verified", "unknown"])
def release(request, monkeypatch):
    """The installed release (verified), or one no fast path lists: there the probes must catch
    every mutation on their own."""
    if request.param == "unknown":
        monkeypatch.setattr(guard, "transformers_release", lambda: "9.99")
    return request.param


def _llama():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                           max_position_embeddings=64)
    return T.LlamaForCausalLM(config).eval()


def _batch():
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _own_logits(model, ids, mask, pos, n):
    """The model's own forward, called as `response_logits` calls it (the LM head on the last n
    positions): when the tail steps aside the two are the same computation, bit for bit."""
    return model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                 use_cache=False, logits_to_keep=n).logits


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]


def test_both_fast_paths_are_trusted_on_the_verified_release():
    model = _llama()
    assert tail.checked_last_layer(model) is not None
    assert decode.decoder_for(model) is not None


def test_on_an_unknown_release_the_probes_decide_and_one_warning_names_it(monkeypatch, caplog):
    monkeypatch.setattr(guard, "transformers_release", lambda: "9.99")
    model, (ids, mask, pos) = _llama(), _batch()
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert tail.checked_last_layer(model) is not None
        assert tail.checked_last_layer(model) is not None  # decided once
        assert decode.decoder_for(model) is not None
    messages = [r.getMessage() for r in caplog.records if "9.99" in r.getMessage()]
    assert len(messages) == 2 and all("self-check" in m and "passed" in m for m in messages)
    assert not _warnings(caplog)


def test_verified_only_steps_aside_on_an_unknown_release(monkeypatch, caplog):
    monkeypatch.setattr(guard, "transformers_release", lambda: "9.99")
    monkeypatch.setenv("TETHER_FAST_PATHS", "verified")
    model, (ids, mask, pos) = _llama(), _batch()
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert tail.checked_last_layer(model) is None
        assert decode.decoder_for(model) is None
    messages = _warnings(caplog)
    assert len(messages) == 2 and all("9.99" in m and "TETHER_FAST_PATHS" in m for m in messages)
    with torch.no_grad():
        torch.testing.assert_close(response_logits(model, ids, mask, pos, 4),
                                   _own_logits(model, ids, mask, pos, 4), rtol=0, atol=0)


def test_a_renamed_cache_keyword_makes_the_tail_step_aside(release, monkeypatch, caplog):
    """A release that renames the layer's cache keyword again (here to `kv_store`): the layer's
    forward now takes a keyword the tail does not know, so it is not trusted."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    own = LlamaDecoderLayer.forward

    def renamed(self, hidden_states, attention_mask=None, position_ids=None, kv_store=None,
                use_cache=False, position_embeddings=None, **kwargs):
        return own(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", renamed)
    model = _llama()
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert tail.checked_last_layer(model) is None
    assert any("kv_store" in m for m in _warnings(caplog))


def test_a_tail_that_computes_something_else_is_caught_by_its_probe(release, monkeypatch, caplog):
    """The tail's forward made wrong (queries rotated at the first positions instead of the
    read ones): the probe disagrees, and the model's own layer runs."""
    right = tail._tail_forward

    def wrong(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if position_embeddings is not None:
            cos, sin = position_embeddings
            position_embeddings = (cos.flip(-2), sin.flip(-2))
        return right(self, hidden_states, attention_mask, position_embeddings, **kwargs)

    monkeypatch.setattr(tail, "_tail_forward", wrong)
    model, (ids, mask, pos) = _llama(), _batch()
    with caplog.at_level(logging.WARNING, logger="tether"):
        with torch.no_grad():
            ours = response_logits(model, ids, mask, pos, 4)
    assert any("probe disagrees" in m for m in _warnings(caplog))
    with torch.no_grad():
        torch.testing.assert_close(ours, _own_logits(model, ids, mask, pos, 4), rtol=0, atol=0)


def test_a_decode_step_that_reads_the_cache_wrong_is_caught_by_its_probe(release, monkeypatch, caplog):
    """A cache layout it misreads (keys and values swapped): the sampler keeps the model's own
    forward, and samples what plain transformers would."""
    from tether.rollout.generate import KVCacheSampler, SamplingParams

    right = decode._cache_kv
    monkeypatch.setattr(decode, "_cache_kv", lambda cache, i: right(cache, i)[::-1])
    model = _llama()
    with caplog.at_level(logging.WARNING, logger="tether"):
        sampler = KVCacheSampler(model, SamplingParams(max_new_tokens=4, temperature=1.0,
                                                       eos_token_ids=(), pad_token_id=0))
    assert sampler.decoder is None
    assert any("probe disagrees" in m for m in _warnings(caplog))


def test_a_renamed_model_cache_keyword_is_caught_by_the_prefix_probe(release, monkeypatch, caplog):
    """What transformers 5.24 did (the forward's `past_key_values` became `cache`), done again: the
    prompt's cache handed over under a name the forward no longer reads. The shared prompt pass
    would then run the responses without their prompt; its probe catches that, and the model's
    own forward runs on the whole rows."""
    monkeypatch.setattr(prefix, "cache_keyword", lambda model: "past_key_value")
    model, g = _llama(), torch.Generator().manual_seed(2)
    prompts = torch.randint(3, 100, (2, 5), generator=g).repeat_interleave(2, dim=0)
    ids = torch.cat([prompts, torch.randint(3, 100, (4, 3), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with caplog.at_level(logging.WARNING, logger="tether"):
        with torch.no_grad():
            assert not prefix.trusted(model)
            ours = response_logits(model, ids, mask, pos, 3)
            # what the shared pass computes with the cache under the old name
            wrong = prefix.shared_logits(model, ids, mask, pos, 3, prefix.prompt_groups(ids, mask, 5))
    assert any("prefix" in m for m in _warnings(caplog))
    with torch.no_grad():  # (the tail fast path still runs, so equal up to its rounding)
        torch.testing.assert_close(ours, _own_logits(model, ids, mask, pos, 3), rtol=1e-4, atol=1e-5)
    assert (wrong - ours).abs().max() > 1e-2
