"""Every stage on architectures the shared fixtures do not build: tiny random models of ten more
causal-LM families (plus two that transformers has no sequence-classification class for), each
trained through tether's CLI and checked from outside with plain transformers."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import _bpe_tokenizer, write_jsonl
from tether.cli import main

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _configs():
    import transformers as T

    return {
        "opt": (T.OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256, word_embed_proj_dim=32)),
        "bloom": (T.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4)),
        "phi": (T.PhiConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=256)),
        "mistral": (T.MistralConfig, SMALL),
        "gemma2": (T.Gemma2Config, dict(SMALL, head_dim=8)),
        "falcon": (T.FalconConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
        "gptj": (T.GPTJConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4)),
        "gpt_bigcode": (T.GPTBigCodeConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
        "qwen3": (T.Qwen3Config, dict(SMALL, head_dim=8)),
        "mixtral": (T.MixtralConfig, dict(SMALL, num_local_experts=2, num_experts_per_tok=1)),
        # no XForSequenceClassification in transformers: tether builds the generic one
        "codegen": (T.CodeGenConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4)),
        "granite": (T.GraniteConfig, SMALL),
    }


NO_HF_CLASS = {"codegen", "granite"}


def _build(path, arch):
    from transformers import AutoModelForCausalLM

    tok = _bpe_tokenizer(path, chat=False)
    cls, kwargs = _configs()[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id, **kwargs))
    model.save_pretrained(path)
    return path


def _data(root):
    rng = random.Random(0)
    pairs, prompts = [], []
    for _ in range(16):
        name, thing = rng.choice(["Lily", "Tom", "Sue"]), rng.choice(["ball", "cat", "dog", "tree"])
        prompt = f"once upon a time, {name} saw a"
        pairs.append({"prompt": prompt, "chosen": f" {thing}. {name} was happy.",
                      "rejected": f" {thing} {thing} {thing}."})
        prompts.append({"prompt": prompt})
    return write_jsonl(root / "pairs.jsonl", pairs), write_jsonl(root / "prompts.jsonl", prompts)


def _texts():
    return [("once upon a time, Tom saw a", " cat. Tom was happy."), ("the cat", " sat on the mat")]


@pytest.mark.parametrize("arch", sorted(_configs()))
def test_rm_and_ppo_on_more_architectures(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tether.models.load import load_tokenizer
    from tether.models.reward import load_reward_model, score_texts

    model = _build(tmp_path / "model", arch)
    pairs, prompts = _data(tmp_path)
    quiet = ["--no-progress", "--no-tensorboard"]
    rm, ppo = tmp_path / "rm", tmp_path / "ppo"
    assert main(["rm", "--model", str(model), "--data", str(pairs), "--output-dir", str(rm),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--eval-fraction", "0",
                 *quiet]) == 0
    texts = _texts()
    ours = score_texts(load_reward_model(str(rm)), load_tokenizer(str(rm)), [p for p, _ in texts],
                       [r for _, r in texts], calibrated=False)
    assert len(set(round(s, 5) for s in ours)) > 1  # the head reads the sequence
    tok = AutoTokenizer.from_pretrained(rm)
    if arch in NO_HF_CLASS:
        with pytest.raises(ValueError, match="Unrecognized configuration class"):
            AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
        # from outside all the same: the plain trunk, and the head's weights from the safetensors
        from safetensors.torch import load_file
        from transformers import AutoModel

        trunk = AutoModel.from_pretrained(rm).eval()
        head = load_file(rm / "model.safetensors")["score.weight"]  # (1, hidden)

        def plain(ids):
            return trunk(input_ids=ids).last_hidden_state[0, -1] @ head[0]
    else:  # plain transformers
        plain_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1).eval()

        def plain(ids):
            return plain_model(input_ids=ids).logits[0, 0]
    with torch.no_grad():  # one unpadded sequence at a time: the same raw scores
        for (prompt, response), score in zip(texts, ours):
            ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
            assert plain(torch.tensor([ids])).item() == pytest.approx(score, abs=1e-5)
    assert main(["ppo", "--policy", str(model), "--reward-model", str(rm), "--prompts", str(prompts),
                 "--output-dir", str(ppo), "--max-steps", "1", "--batch-size", "4",
                 "--response-length", "6", *quiet]) == 0
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    out = policy.generate(**tok("once upon a time", return_tensors="pt"), max_new_tokens=3,
                          do_sample=True, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > 0
    assert json.loads((ppo / "tether_run.json").read_text())["complete"] is True
