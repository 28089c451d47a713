"""What a rollout engine with its own weights is sent (`rollout.vllm_engine.policy_weights`):
the policy's parameters under their Hugging Face names, and for LoRA the merged weights, with
the policy left as it was. Needs no vLLM."""

import copy

import torch

from tether.rollout.vllm_engine import policy_weights


def _lm(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"])


def test_a_plain_policy_is_sent_as_its_named_parameters(tiny_models):
    lm = _lm(tiny_models)
    sent = dict(policy_weights(lm))
    assert sent.keys() == dict(lm.named_parameters()).keys()
    assert all(torch.equal(sent[n], p) for n, p in lm.named_parameters())


def test_a_lora_policy_is_sent_merged_and_left_unmerged(tiny_models):
    from tether.models.load import apply_lora

    lm = apply_lora(_lm(tiny_models), 4, 16, 0.0, "all-linear")
    with torch.no_grad():  # trained adapters: B is no longer zero
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {n: p.clone() for n, p in lm.named_parameters()}
    sent = dict(policy_weights(lm))
    merged = copy.deepcopy(lm).merge_and_unload()
    expected = dict(merged.named_parameters())
    assert sent.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(sent[name], tensor, atol=1e-6), name
    assert any(not torch.equal(sent[n], dict(_lm(tiny_models).named_parameters())[n]) for n in sent)
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters())  # the policy is untouched
