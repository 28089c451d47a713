"""The world's generator: determinism, the train/eval split, and the shape of its data."""

import random
import subprocess
import sys

import pytest

from tether.world import World, judge, split_of
from tether.world.corpus import MAX_DOCUMENT_WORDS
from tether.world.prompts import (
    EVAL_PERCENT,
    PROMPT_MARKER,
    parse_prompt,
    sample_task,
    write_prompt,
)
from tether.world.responses import QUALITIES, respond


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_same_seed_same_data_and_other_seed_other_data(world):
    again = World(seed=0)
    assert world.prompts(50) == again.prompts(50)
    assert world.corpus(20) == again.corpus(20)
    assert world.demonstrations(20) == again.demonstrations(20)
    assert world.pairs(20) == again.pairs(20)
    assert world.rankings(10) == again.rankings(10)
    other = World(seed=1)
    assert world.prompts(50) != other.prompts(50)
    assert world.corpus(20) != other.corpus(20)
    assert world.pairs(20) != other.pairs(20)


def test_a_shorter_call_is_a_prefix_of_a_longer_one(world):
    assert world.prompts(100)[:30] == world.prompts(30)
    assert world.corpus(40)[:10] == world.corpus(10)


def test_thousands_of_distinct_prompts_and_a_disjoint_held_out_split(world):
    train, held_out = world.prompts(3000, "train"), world.prompts(300, "eval")
    assert len(set(train)) == 3000 and len(set(held_out)) == 300
    assert not set(train) & set(held_out)
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "eval" for p in held_out)
    # The split is a property of the text, so every seed and every data set agrees on it.
    assert all(split_of(r["prompt"]) == "eval" for r in World(seed=7).pairs(50, "eval"))
    assert all(split_of(r["prompt"]) == "train" for r in World(seed=7).demonstrations(50))


def test_split_is_a_stable_hash_of_the_text():
    # Hard-coded, so that a change of hash (which would reshuffle every split) is caught.
    assert split_of("what does the big red whale do ? answer :") == "train"
    assert split_of("what does the big white mouse do ? answer :") == "eval"
    assert split_of("what happens next : the tiny blue robot works in the pond . answer :") == "eval"
    rng = random.Random(0)
    drawn = [write_prompt(sample_task(rng), rng) for _ in range(5000)]
    share = sum(split_of(p) == "eval" for p in drawn) / len(drawn)
    assert abs(share - EVAL_PERCENT / 100) < 0.02


def test_held_out_prompts_never_appear_in_the_corpus(world):
    held_out = world.prompts(300, "eval")
    corpus = "\n".join(world.corpus(2000))
    assert not [p for p in held_out if p in corpus]


def test_prompts_end_with_the_marker_and_parse_back(world):
    for prompt in world.prompts(400):
        assert prompt.endswith(" " + PROMPT_MARKER)
        assert parse_prompt(prompt).name in ("describe", "action", "compare", "continue")


def test_documents_are_short_enough_for_the_base_model(world):
    documents = world.corpus(3000)
    assert max(len(d.split()) for d in documents) <= MAX_DOCUMENT_WORDS
    assert any(PROMPT_MARKER in d for d in documents)  # exchanges
    assert any(PROMPT_MARKER not in d for d in documents)  # stories


def test_demonstrations_are_mostly_good_but_not_all(world):
    rows = world.demonstrations(400)
    assert all(set(r) == {"prompt", "completion"} and r["completion"] for r in rows)
    verdicts = [judge(r["prompt"], r["completion"]) for r in rows]
    flawless = [v.coverage == 1 and not (v.wrong or v.illegal or v.repeats) for v in verdicts]
    assert 0.6 < sum(flawless) / len(rows) < 0.95


def test_every_quality_writes_world_text(world):
    for prompt in world.prompts(40):
        task = parse_prompt(prompt)
        for quality in QUALITIES:
            response = respond(task, quality, world.rng("test"))
            assert response == " ".join(response.split())  # single spaces, no edges


def test_importing_the_world_does_not_import_torch():
    code = "import sys, tether.world; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
