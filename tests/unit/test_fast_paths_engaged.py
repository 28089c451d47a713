"""On the installed transformers release, every fast path that re-implements part of a model
(`tether.models.tail`, `tether.rollout.decode`, `tether.models.prefix`) is engaged on the
families it supports: its probe against the model's own forward passes, and nothing steps aside.

CI runs this file (with the guard's and the fast paths' own tests) in an environment with the
newest releases and no lock, so a release that breaks a fast path fails CI instead of quietly
slowing a user's run (the probe would make it step aside there, with a warning)."""

import logging

import pytest
import torch

from tether.models import prefix, tail
from tether.models.guard import transformers_release
from tether.rollout import decode

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _model(family: str):
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    config = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config,
              "qwen3": T.Qwen3Config}[family](**common)
    cls = {"llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM, "qwen2": T.Qwen2ForCausalLM,
           "qwen3": T.Qwen3ForCausalLM}[family]
    return cls(config)


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv("TETHER_FAST_PATHS", raising=False)
    for g in (tail.GUARD, decode.GUARD, prefix.GUARD, prefix.GUARD_GRADIENTS):
        g.forget()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_fast_path_is_engaged(family, caplog):
    model = _model(family).eval()
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert tail.checked_last_layer(model) is not None, "the tail steps aside"
        assert decode.decoder_for(model) is not None, "the fused decode step steps aside"
        with torch.no_grad():
            assert prefix.trusted(model), "the shared prompt pass steps aside"
        model.train()
        assert prefix.trusted(model), "the shared prompt pass with gradients steps aside"
    aside = [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]
    assert not aside, f"transformers {transformers_release()}: {aside}"
