"""One prompt pass per distinct prompt (`tether.models.prefix`): the same logits and gradients
as the whole-row forward on every test architecture, used wherever rows repeat prompts, and
stepping aside where it must."""

import pytest
import torch

from tether.models import prefix
from tether.models.critic import Actor, response_logits
from tether.models.prefix import prompt_groups, shared_logits
from tether.rollout.generate import KVCacheSampler, SamplingParams


def _grouped_batch(vocab: int, prompts: int = 3, G: int = 4, P: int = 7, T: int = 5):
    """`prompts` prompts (the second left-padded by 3), each G times with its own responses."""
    g = torch.Generator().manual_seed(3)
    head = torch.randint(3, vocab, (prompts, P), generator=g).repeat_interleave(G, dim=0)
    ids = torch.cat([head, torch.randint(3, vocab, (prompts * G, T), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    mask[G:2 * G, :3] = 0
    ids[G:2 * G, :3] = 0  # pad ids under the padding, as a collator writes them
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, T


def _load(path):
    from transformers import AutoModelForCausalLM

    # eval: no dropout (GPT-2 has some), so that two forwards compute the same function
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _whole(lm, ids, mask, pos, T):
    """What the model's own forward gives on the whole rows."""
    return lm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
              use_cache=False).logits[:, -T:]


def test_prompt_groups_finds_the_repeats_and_declines_when_few():
    ids = torch.tensor([[5, 6, 9], [5, 6, 8], [1, 2, 7], [1, 2, 7], [5, 6, 1]])
    mask = torch.ones_like(ids)
    groups = prompt_groups(ids, mask, n_prompt=2)
    assert groups is not None
    first, inverse = groups
    assert torch.equal(ids[first][inverse][:, :2], ids[:, :2])  # every row gets its own prompt
    assert len(first) == 2
    # the same ids under another mask are another prompt: 3 distinct of 5 rows is too few repeats,
    # of 6 rows enough
    mask2 = mask.clone()
    mask2[1, 0] = 0
    assert prompt_groups(ids, mask2, 2) is None
    ids6, mask6 = torch.cat([ids, ids[:1]]), torch.cat([mask2, mask2[:1]])
    assert len(prompt_groups(ids6, mask6, 2).first) == 3
    # fewer than half the rows repeat: nothing to share
    assert prompt_groups(ids[:3], mask[:3], 2) is None
    assert prompt_groups(ids, mask, n_prompt=1) is None  # a one-token prompt has no prefix


def test_shared_logits_and_gradients_equal_the_whole_forward(tiny_model):
    lm = _load(tiny_model)
    ids, mask, pos, T = _grouped_batch(lm.config.vocab_size)
    groups = prompt_groups(ids, mask, ids.shape[1] - T)
    assert groups is not None and len(groups.first) == 3
    params = [p for p in lm.parameters() if p.requires_grad]
    w = torch.randn(ids.shape[0], T, lm.config.vocab_size, generator=torch.Generator().manual_seed(0))
    whole = _whole(lm, ids, mask, pos, T)
    theirs = torch.autograd.grad((whole * w).sum(), params, allow_unused=True)
    ours_logits = shared_logits(lm, ids, mask, pos, T, groups)
    ours = torch.autograd.grad((ours_logits * w).sum(), params, allow_unused=True)
    torch.testing.assert_close(ours_logits, whole, rtol=1e-4, atol=1e-5)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert prefix.trusted(lm), "the probe must pass on every test architecture, or the path is never used"


def test_response_logits_computes_each_prompt_once(tiny_model):
    lm = _load(tiny_model)
    ids, mask, pos, T = _grouped_batch(lm.config.vocab_size)
    prefix.trusted(lm)  # the probe's own calls are not counted
    rows = []
    handle = lm.register_forward_pre_hook(lambda m, args, kw: rows.append(tuple(kw["input_ids"].shape)),
                                          with_kwargs=True)
    logits = response_logits(lm, ids, mask, pos, T)
    handle.remove()
    P = ids.shape[1] - T
    assert rows == [(3, P - 1), (12, T)]  # distinct prompts, then every row's response
    with torch.no_grad():
        torch.testing.assert_close(logits, _whole(lm, ids, mask, pos, T), rtol=1e-4, atol=1e-5)


def test_value_head_reads_the_response_positions(tiny_models):
    lm = _load(tiny_models["llama"])
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    ids, mask, pos, T = _grouped_batch(lm.config.vocab_size)
    actor = Actor(lm, head)
    logits, values = actor(ids, mask, pos, T)
    hidden = lm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                output_hidden_states=True).hidden_states[-1][:, -T:]
    torch.testing.assert_close(values, head(hidden).squeeze(-1), rtol=1e-4, atol=1e-5)
    assert logits.shape == (ids.shape[0], T, lm.config.vocab_size)


def test_steps_aside_under_gradient_checkpointing(tiny_models):
    lm = _load(tiny_models["llama"]).train()
    assert prefix.usable(lm)
    lm.gradient_checkpointing_enable()
    assert not prefix.usable(lm)
    lm.eval()  # checkpointing does nothing outside training
    assert prefix.usable(lm)


def test_the_probe_catches_a_wrong_repeat(tiny_models, monkeypatch):
    lm = _load(tiny_models["llama"])
    assert prefix._probe(lm, gradients=True) is None

    def wrong(lm, ids, mask, pos, T, groups):  # every row reads the first prompt's cache
        return shared_logits(lm, ids, mask, pos, T, prefix.PromptGroups(groups.first, torch.zeros_like(groups.inverse)))

    monkeypatch.setattr(prefix, "shared_logits", wrong)
    problem = prefix._probe(lm, gradients=True)
    assert problem is not None and "disagrees" in problem


@pytest.mark.parametrize("fused", [False, True], ids=["own-forward", "fused-step"])
def test_sampler_prefills_each_prompt_once_and_samples_the_same(tiny_model, fused, monkeypatch):
    """Decoding on the repeated cache, through the model's own forward or (Llama, Qwen2) the
    fused decode step, which takes the cache over."""
    lm = _load(tiny_model)
    ids, mask, _, T = _grouped_batch(lm.config.vocab_size)
    P = ids.shape[1] - T
    prompts, prompt_mask = ids[:, :P], mask[:, :P]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, eos_token_ids=(), pad_token_id=0)

    def sample(share: bool):
        monkeypatch.setattr(prefix, "usable", lambda model: share)
        sampler = KVCacheSampler(lm, params, fused=fused)  # the fused step's own probe runs here
        assert (sampler.decoder is not None) == (fused and type(lm).__name__ in ("LlamaForCausalLM", "Qwen2ForCausalLM"))
        rows = []
        handle = lm.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                              with_kwargs=True)
        out = sampler.generate(prompts, prompt_mask, torch.Generator().manual_seed(7))
        handle.remove()
        return out.response_ids, rows

    with torch.no_grad():  # the sampler's verdict (outputs only): its probe's calls are not counted
        assert prefix.trusted(lm)
    shared, shared_rows = sample(True)
    plain, plain_rows = sample(False)
    assert shared_rows[0] == 3 and plain_rows[0] == 12  # the prefill
    assert torch.equal(shared, plain)


def test_a_sliding_window_shorter_than_the_rows(tmp_path):
    """Mistral with a 4-token window over 11-token rows: the repeated cache keeps the window."""
    import transformers as T

    torch.manual_seed(0)
    lm = T.MistralForCausalLM(T.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=120, max_position_embeddings=64, sliding_window=4)).eval()
    ids, mask, pos, T_ = _grouped_batch(lm.config.vocab_size)
    groups = prompt_groups(ids, mask, ids.shape[1] - T_)
    with torch.no_grad():
        torch.testing.assert_close(shared_logits(lm, ids, mask, pos, T_, groups), _whole(lm, ids, mask, pos, T_),
                                   rtol=1e-4, atol=1e-5)


def test_the_probe_passes_on_other_families():
    """Families the suite has no fixture for; OPT has a key bias, whose gradient is rounding
    noise around zero (the probe compares all gradients together)."""
    import transformers as T

    common = dict(vocab_size=120, max_position_embeddings=64)
    for config in (T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=32, **common),
                   T.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, **common),
                   T.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common)):
        torch.manual_seed(0)
        lm = T.AutoModelForCausalLM.from_config(config).eval()
        assert prefix._probe(lm, gradients=True) is None, type(lm).__name__


def test_a_pass_without_gradients_probes_outputs_only(tiny_models, monkeypatch):
    """Sampling and the reference never start autograd for the probe; a forward whose gradients
    are used gets the probe with gradients, once per model."""
    lm = _load(tiny_models["llama"])
    seen = []
    real = prefix._probe
    monkeypatch.setattr(prefix, "_probe", lambda model, gradients: seen.append(gradients) or real(model, gradients))
    with torch.no_grad():
        assert prefix.trusted(lm) and prefix.trusted(lm)
    assert prefix.trusted(lm) and prefix.trusted(lm)
    assert seen == [False, True]
