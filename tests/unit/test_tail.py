"""`reading_last`: the last decoder layer computed at the read positions only gives the model's
own outputs there, and the same gradients."""

import pytest
import torch

from tether.models.critic import response_logits
from tether.models.reward import sequence_scores
from tether.models.tail import checked_last_layer, last_layer, reading_last


def _config(arch: str, **extra):
    import transformers as T

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=120, max_position_embeddings=64, **extra)
    if arch == "llama":  # every bias on, GQA
        return T.LlamaConfig(attention_bias=True, mlp_bias=True, **common)
    if arch == "mistral":  # a sliding window shorter than the sequences, head_dim != d / H
        return T.MistralConfig(sliding_window=5, head_dim=16, **common)
    if arch == "qwen3":  # RMSNorm on each head's q and k
        return T.Qwen3Config(head_dim=8, **common)
    return T.Qwen2Config(**common)  # q/k/v biases


def _model(arch: str, kind: str = "lm", **extra):
    import transformers as T

    torch.manual_seed(0)
    cls = T.AutoModelForCausalLM if kind == "lm" else T.AutoModelForSequenceClassification
    if kind == "rm":
        extra = {**extra, "num_labels": 1, "pad_token_id": 0}
    model = cls.from_config(_config(arch, **extra))
    with torch.no_grad():  # non-zero biases, so that a bias applied wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.train()


def _batch(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding of different widths
        mask[0, :4] = 0
        mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _mlp_rows(model):
    """The number of positions the last layer's MLP ran on, per call (after the guard's probe,
    which runs once per model, has run)."""
    seen = []
    assert checked_last_layer(model) is not None
    last_layer(model).mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _within_float_error(ours, theirs, exact, name):
    """`ours` (pruned, float32) is as close to the float64 result `exact` as the model's own
    float32 forward `theirs` is, give or take a factor of 4 and a few ulps of the magnitude:
    a bound set by the float error of this computation on this CPU, not by a fixed number."""
    exact = exact.double()
    scale = exact.abs().max().item()
    own = (theirs.double() - exact).abs().max().item()
    err = (ours.double() - exact).abs().max().item()
    bound = 4 * max(own, 16 * torch.finfo(torch.float32).eps * scale)
    assert err <= bound, f"{name}: error {err:.3g} against float64, the model's own {own:.3g}"


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_logits_and_gradients_match_the_full_last_layer(arch, padded):
    import copy

    model, (ids, mask, pos), T = _model(arch), _batch(padded), 5
    exact_model = copy.deepcopy(model).double()
    seen = _mlp_rows(model)
    weights = torch.randn(3, T, 120, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {}
    for kind, m in (("own", model), ("pruned", model), ("exact", exact_model)):
        m.zero_grad()
        if kind == "pruned":
            logits = response_logits(m, ids, mask, pos, T)
        else:  # the model's own forward on every position, then the same slice
            logits = m(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                       use_cache=False).logits[:, -T:]
        (logits * weights.to(logits.dtype)).sum().backward()
        out[kind] = (logits.detach(), _grads(m))
    assert seen == [11, T]  # the full layer ran on the 11 fed positions, the pruned one on T
    _within_float_error(out["pruned"][0], out["own"][0], out["exact"][0], "logits")
    assert out["pruned"][1].keys() == out["own"][1].keys() == out["exact"][1].keys()
    for name, grad in out["own"][1].items():
        _within_float_error(out["pruned"][1][name], grad, out["exact"][1][name], name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reward_scores_of_right_padded_rows_match_the_model_s_own(arch):
    rm = _model(arch, kind="rm", initializer_range=0.3).eval()  # weights big enough to matter
    seen = _mlp_rows(rm)
    ids = torch.randint(3, 120, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding: the earliest last token is at position 6
    mask[2, 9:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ours = sequence_scores(rm, ids, mask)
        theirs = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert seen == [4, 10]  # positions 6..9 in the pruned pass; all 10 in the model's own
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lora_wrapped_models_are_pruned_through_their_adapters():
    from peft import LoraConfig, get_peft_model

    model = _model("llama")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    (ids, mask, pos), T = _batch(True), 4
    seen = _mlp_rows(model)
    full = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1]).logits[:, -T:]
    pruned = response_logits(model, ids, mask, pos, T)
    assert seen == [11, T]
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-5)


def test_what_it_does_not_support_runs_the_model_s_own_layer():
    import transformers as T

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=120))
    assert last_layer(gpt2) is None
    eager = _model("llama", attn_implementation="eager")
    assert last_layer(eager) is None
    checkpointed = _model("llama")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = _mlp_rows(checkpointed)
    (ids, mask, pos), T = _batch(True), 5
    response_logits(checkpointed, ids, mask, pos, T).sum().backward()
    assert seen[0] == 11  # checkpointing recomputes the layer later, outside the block: not pruned
    model = _model("llama")
    seen = _mlp_rows(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True)  # outside any block
        with reading_last(model, 3):  # a KV cache (generation's prefill): the layer's own forward
            model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert seen == [12, 12]


def test_nothing_of_it_outlives_the_block():
    import copy
    import pickle

    model = _model("llama")
    layer = last_layer(model)
    (ids, mask, pos), T = _batch(True), 4
    with reading_last(model, T):
        with reading_last(model, T + 1):  # nested: the inner count, then the outer one again
            assert layer._tether_read == T + 1
        assert layer._tether_read == T
        response_logits(model, ids, mask, pos, T)
    assert "forward" not in vars(layer) and "_tether_read" not in vars(layer)
    pickle.loads(pickle.dumps(model))
    copy.deepcopy(model)
