"""The world tokenizer and the tiny base model directory."""

import pytest

from tether.world import World, base_model_config, build_tokenizer, init_base_model
from tether.world import vocab


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_tokenizer")
    return build_tokenizer(str(out), texts=World(seed=0).corpus(500))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id,
                tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    # No special tokens are added by encoding: tether's data code adds bos and eos itself.
    assert tokenizer("the fox .")["input_ids"] == tokenizer.convert_tokens_to_ids(["the", "fox", "."])


def test_vocabulary_is_the_world_words(tokenizer):
    assert len(tokenizer) == len(vocab.WORDS) + 4
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra")["input_ids"]) == ["<unk>"]


def test_world_text_round_trips_exactly(tokenizer):
    world = World(seed=1)
    texts = world.corpus(200) + world.prompts(100, "eval")
    texts += [r["completion"] for r in world.demonstrations(100)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_prompt_and_completion_tokenize_apart_as_together(tokenizer):
    for row in World(seed=2).demonstrations(50):
        apart = tokenizer(row["prompt"])["input_ids"] + tokenizer(row["completion"])["input_ids"]
        together = tokenizer(row["prompt"] + " " + row["completion"])["input_ids"]
        assert apart == together
        ids = [tokenizer.bos_token_id] + apart + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids, skip_special_tokens=True) == row["prompt"] + " " + row["completion"]


def test_same_corpus_same_ids(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(build_tokenizer(str(tmp_path), texts=World(seed=0).corpus(500)))
    assert again.get_vocab() == tokenizer.get_vocab()


def test_base_model_directory_loads(tmp_path, tokenizer_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = base_model_config(tokenizer_dir)
    assert config.vocab_size == len(tokenizer) and config.tie_word_embeddings
    assert config.pad_token_id != config.eos_token_id
    out = init_base_model(str(tmp_path / "base"), tokenizer_dir, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (tmp_path / "base" / "model.safetensors").exists()
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("the fox .")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, 4, len(tokenizer))


def _copy_probability(model, tokenizer, rows) -> float:
    """Mean probability the model gives the place a sentence named earlier, at its repeat."""
    import torch

    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"] for text in rows])
    with torch.no_grad():
        probs = model(input_ids=ids).logits[:, -2].softmax(-1)
    return probs.gather(1, ids[:, -1:]).mean().item()


def test_base_model_init_lets_it_learn_to_copy_from_context(tokenizer_dir, tokenizer):
    """At transformers' default init (std 0.02) this narrow model sits on a plateau where its
    attention ignores which word it sees, and copying a word from earlier in the context is not
    learned for hundreds of steps. At the world's init (1/sqrt(width)) it is learned in 60."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from tether.world import base_model

    def sentence(rng):
        place = rng.choice(vocab.PLACES)
        return (f"there is a {rng.choice(vocab.SIZES)} {rng.choice(vocab.KINDS)} in the {place} ."
                f" then it rests by the {place}")

    rng = random.Random(0)
    probes = [sentence(rng) for _ in range(64)]
    probabilities = {}
    for std in (0.02, base_model.INIT_STD):
        config = base_model_config(tokenizer_dir)
        config.initializer_range = std
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(60):
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(sentence(rng))["input_ids"]
                                for _ in range(32)])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        probabilities[std] = _copy_probability(model, tokenizer, probes)
    uniform = 1 / len(vocab.PLACES)
    assert probabilities[0.02] < 2 * uniform  # the plateau the default init leaves it on
    assert probabilities[base_model.INIT_STD] > 0.5
    assert base_model_config(tokenizer_dir).initializer_range == base_model.INIT_STD
