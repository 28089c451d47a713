"""The world's export round-trips through the stages' own data loaders, with the world's own
tokenizer: SFT rows, preference pairs and K-wise rankings, and prompts."""

import pytest

from tether.data.io import load_rows
from tether.data.preference import load_preference_groups
from tether.data.sft import IGNORE, tokenize_sft
from tether.models.load import load_tokenizer
from tether.world import build_tokenizer, export


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = export(str(out / "data"), seed=0, n_corpus=200, n_sft=30, n_sft_eval=10, n_pairs=30,
                   n_pairs_eval=10, n_rankings=10, k=4, n_prompts=20, n_prompts_eval=5)
    tok_dir = build_tokenizer(str(out / "tok"), n_documents=300)
    return paths, load_tokenizer(tok_dir)


def test_sft_rows_tokenise_with_the_prompt_masked(world):
    paths, tok = world
    ds = load_rows(paths["sft"])
    examples = tokenize_sft(ds, tok, paths["sft"], max_length=128, over_length="drop")
    assert len(examples) == len(ds)
    for ex, row in zip(examples, ds):
        scored = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
        assert tok.decode(scored[:-1]) == row["completion"]  # exactly the completion, then EOS
        assert scored[-1] == tok.eos_token_id


def test_pairs_and_rankings_load_as_preference_groups(world):
    paths, tok = world
    pairs = load_preference_groups(paths["pairs"], tok, max_length=128)
    assert len(pairs) == 30 and all(len(g.response_ids) == 2 and g.gold for g in pairs)
    ranked = load_preference_groups(paths["rankings"], tok, max_length=128)
    assert len(ranked) == 10 and all(len(g.response_ids) == 4 for g in ranked)
    assert all(len(g.pairs()) >= 3 for g in ranked)


def test_prompts_load_for_ppo(world):
    from tether.recipes.online.data import load_prompts

    paths, tok = world
    prompts = load_prompts(paths["prompts_eval"], tok, max_length=64, truncation="drop")
    assert len(prompts.ids) == 5
    assert all(tok.decode(ids) == text for ids, text in zip(prompts.ids, prompts.texts))
