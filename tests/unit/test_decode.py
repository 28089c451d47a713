"""The fused decode step computes what the model's own cached forward computes, architecture by
architecture, and every model it does not know keeps its own forward."""

import pytest
import torch

from tether.rollout.decode import decoder_for, unsupported_reason
from tether.rollout.generate import KVCacheSampler, SamplingParams, left_pad
from tether.rollout.types import position_ids_from_mask

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # left-padded to 6: padding in 2 rows


def _model(arch: str, dtype=torch.float32, **overrides):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    configs = {
        # biases on every projection, and a rope with llama3 frequency scaling
        "llama": (LlamaConfig, LlamaForCausalLM, dict(
            attention_bias=True, mlp_bias=True, rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
        "mistral": (MistralConfig, MistralForCausalLM, dict(head_dim=24)),  # head_dim != d / heads
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24, attention_bias=True)),  # q/k head norms
    }
    config_cls, model_cls, extra = configs[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**common, **extra, **overrides})).to(dtype).eval()
    with torch.no_grad():  # zero-initialised biases would test nothing
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # ones would test less
                p.normal_(1, 0.5)
    return model


def _step_by_step(model, steps: int = 5, tamper=None):
    """Logits of the fused step and of the model's own cached forward, fed the same tokens.
    tamper(decoder), if given, runs after the decoder has taken over the prefill's cache."""
    ids, mask = left_pad(PROMPTS, 0)
    B, P = ids.shape
    positions = position_ids_from_mask(mask)
    decoder = decoder_for(model)
    assert decoder is not None, unsupported_reason(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        decoder.start(out.past_key_values, mask, P + steps)
        if tamper is not None:
            tamper(decoder)
        cache, full_mask = out.past_key_values, mask
        gen = torch.Generator().manual_seed(1)
        ours, theirs = [], []
        for t in range(steps):
            token = torch.randint(1, 64, (B,), generator=gen)
            position = positions[:, -1] + 1 + t
            ours.append(decoder.step(token, position))
            full_mask = torch.cat([full_mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=token[:, None], attention_mask=full_mask, position_ids=position[:, None],
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            theirs.append(out.logits[:, -1])
    return torch.stack(ours, 1), torch.stack(theirs, 1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_step_equals_the_models_cached_forward(arch):
    ours, theirs = _step_by_step(_model(arch))
    assert ours.shape == theirs.shape == (3, 5, 64)
    assert theirs.std() > 0.1  # logits with something to compare
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_fused_step_in_bfloat16_stays_within_bf16_rounding():
    ours, theirs = _step_by_step(_model("qwen2", torch.bfloat16))
    assert ours.dtype == theirs.dtype == torch.bfloat16
    err = (ours.float() - theirs.float()).abs().max()
    assert err < 0.05 * theirs.float().abs().max()


def test_multi_query_attention_groups_all_heads_on_one_kv_head():
    ours, theirs = _step_by_step(_model("llama", num_key_value_heads=1))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_the_comparison_catches_a_step_that_reads_the_wrong_kv_head():
    """The check above can fail: swap which cached K head each query group reads."""
    def swap_kv_heads(decoder):
        for keys in decoder.keys:
            keys.copy_(keys.flip(1))

    ours, theirs = _step_by_step(_model("llama"), tamper=swap_kv_heads)
    assert (ours - theirs).abs().max() > 1e-3


def test_sampler_with_the_fused_step_draws_what_the_plain_loop_draws():
    model = _model("llama")
    ids, mask = left_pad(PROMPTS, 0)
    params = SamplingParams(12, temperature=0.8, eos_token_ids=(3,), pad_token_id=0)
    fused = KVCacheSampler(model, params)
    plain = KVCacheSampler(model, params, fused=False)
    assert fused.decoder is not None and plain.decoder is None
    a = fused.generate(ids, mask, torch.Generator().manual_seed(7))
    b = plain.generate(ids, mask, torch.Generator().manual_seed(7))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)


def test_other_architectures_keep_their_own_forward(tiny_models):
    from transformers import AutoModelForCausalLM

    for arch in ("gpt2", "neox"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
        assert decoder_for(model) is None and "not one of" in unsupported_reason(model)
    sliding = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding-window" in unsupported_reason(sliding)


def test_supported_classes_in_unsupported_settings_keep_their_own_forward():
    from transformers import LlamaForCausalLM

    class RemoteLlama(LlamaForCausalLM):  # remote code may reuse the name for another layout
        pass

    RemoteLlama.__name__ = "LlamaForCausalLM"
    assert "not one of" in unsupported_reason(RemoteLlama(_model("llama").config))
    offloaded = _model("llama")
    offloaded.model.layers[1].mlp._hf_hook = object()  # what accelerate's cpu_offload attaches
    assert "hooks" in unsupported_reason(offloaded)
    assert "CPU only" in unsupported_reason(_model("llama").to("meta"))  # measured on CPU only
    moved = _model("llama")
    decoder = decoder_for(moved)
    assert decoder.fits(8)
    moved.to("meta")  # moved after the sampler was built: the model's own forward again
    assert not decoder.fits(8)


def test_lora_wrapped_projections_keep_the_models_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decoder_for(model) is None  # the PeftModel wrapper
    assert "nn.Linear" in unsupported_reason(model.get_base_model())  # and the injected layers


def test_a_sliding_window_shorter_than_the_sequence_falls_back_per_call():
    model = _model("mistral", sliding_window=8)
    ids, mask = left_pad(PROMPTS, 0)  # P = 6
    short, long = SamplingParams(2, pad_token_id=0), SamplingParams(6, pad_token_id=0)
    sampler = KVCacheSampler(model, short)
    assert sampler.decoder.fits(6 + 2) and not sampler.decoder.fits(6 + 6)
    plain = KVCacheSampler(model, long, fused=False).generate(ids, mask, torch.Generator().manual_seed(0))
    sampler.params = long  # 12 tokens > window 8: the model's own forward applies the window
    ours = sampler.generate(ids, mask, torch.Generator().manual_seed(0))
    assert torch.equal(ours.response_ids, plain.response_ids)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_extend_feeds_a_chunk_as_the_models_forward_reads_the_whole_sequence(arch):
    """FusedDecoder.extend (the tokens a context adds between two turns of an episode): after a
    prefill and two steps, a right-aligned chunk with padding holes gives the logits the model's
    own forward gives on each row's whole sequence, holes left out."""
    model = _model(arch)
    ids, mask = left_pad(PROMPTS, 0)
    B, P = ids.shape
    positions = position_ids_from_mask(mask)
    decoder = decoder_for(model)
    gen = torch.Generator().manual_seed(2)
    added = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (4, 1, 3)]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        decoder.start(out.past_key_values, mask, P + 2 + 4)
        steps = torch.randint(1, 64, (2, B), generator=gen)
        for t in range(2):
            decoder.step(steps[t], positions[:, -1] + 1 + t)
        chunk, valid = left_pad(added, 0)
        start = positions[:, -1] + 3
        ours = decoder.extend(chunk, start[:, None] + (valid.cumsum(-1) - 1).clamp(min=0), valid.bool())
        theirs = []
        for b in range(B):
            whole = ids[b][mask[b].bool()].tolist() + steps[:, b].tolist() + added[b]
            theirs.append(model(input_ids=torch.tensor([whole])).logits[0, -1])
    torch.testing.assert_close(ours, torch.stack(theirs), atol=3e-5, rtol=1e-5)
