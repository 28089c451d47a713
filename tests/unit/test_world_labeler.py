"""The noisy labeler: Bradley-Terry pairs and Plackett-Luce rankings at one temperature."""

import math
import random

import pytest

from tether.world import TEMPERATURE, World, disagreement_rate, label_pairs, prefer_probability
from tether.world.labeler import rank, rank_responses


def test_bradley_terry_probability_by_hand():
    assert prefer_probability(1.0, 1.0) == 0.5
    # A gap of one temperature: sigmoid(1) = 0.7311.
    assert prefer_probability(1.0 + TEMPERATURE, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert prefer_probability(0.3, 1.2) + prefer_probability(1.2, 0.3) == pytest.approx(1.0)
    assert prefer_probability(-1e9, 1e9) == 0.0


def test_close_pairs_disagree_with_gold_20_to_30_percent():
    # 4000 pairs -> ~2000 close ones: the standard error of the rate is about 1%.
    rates = disagreement_rate(World(seed=0).pairs(4000))
    assert 0.20 <= rates["close"] <= 0.30
    assert rates["overall"] < rates["close"]
    assert rates["n_close"] >= 1900


def test_disagreement_rate_by_hand():
    rows = [
        {"gold_chosen": 1.0, "gold_rejected": 0.9},  # gap 0.1, right
        {"gold_chosen": 0.8, "gold_rejected": 1.0},  # gap 0.2, wrong
        {"gold_chosen": 2.0, "gold_rejected": 0.0},  # gap 2.0, right
        {"gold_chosen": 0.0, "gold_rejected": 3.0},  # gap 3.0, wrong
        {"gold_chosen": 0.5, "gold_rejected": 0.5},  # tie: left out
    ]
    rates = disagreement_rate(rows)
    assert rates["median_gap"] == pytest.approx(1.1)  # median of 0.1, 0.2, 2.0, 3.0
    assert rates["n"] == 4 and rates["n_close"] == 2
    assert rates["overall"] == 0.5 and rates["close"] == 0.5


def test_label_pairs_is_seeded_and_keeps_gold():
    world = World(seed=0)
    prompts = world.prompts(200)
    good = ["the small red fox hunts ."] * 200
    bad = ["fox the ."] * 200
    rows = label_pairs(prompts, good, bad, seed=3)
    assert rows == label_pairs(prompts, good, bad, seed=3)
    assert rows != label_pairs(prompts, good, bad, seed=4) or all(r["chosen"] == good[0] for r in rows)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}
        assert {row["chosen"], row["rejected"]} == {good[0], bad[0]}
    with pytest.raises(ValueError):
        label_pairs(prompts, good, bad[:-1])


def test_labels_follow_the_bradley_terry_rate():
    prompt = "describe the small red fox in the forest . answer :"
    a, b = "the small red fox hunts in the forest .", "the red fox hunts in the forest ."
    rows = label_pairs([prompt] * 4000, [a] * 4000, [b] * 4000, seed=0)
    gold_a, gold_b = rows[0]["gold_chosen"], rows[0]["gold_rejected"]
    gold_a, gold_b = max(gold_a, gold_b), min(gold_a, gold_b)
    share = sum(r["chosen"] == a for r in rows) / len(rows)
    assert share == pytest.approx(prefer_probability(gold_a, gold_b), abs=0.03)


def test_plackett_luce_ranks_are_a_permutation_and_follow_gold():
    rng = random.Random(0)
    ranks = rank([0.0, 2.0, 1.0, -1.0], rng, temperature=1e-3)  # near-deterministic
    assert ranks == [2, 0, 1, 3]
    counts = [0, 0]
    for _ in range(2000):
        r = rank([1.0, 1.0 + TEMPERATURE], rng)
        counts[r.index(0)] += 1
    assert counts[1] / 2000 == pytest.approx(prefer_probability(1.0 + TEMPERATURE, 1.0), abs=0.03)


def test_rankings_rows():
    for row in World(seed=0).rankings(30, k=4):
        assert sorted(row["ranks"]) == [0, 1, 2, 3]
        assert len(row["responses"]) == len(set(row["responses"])) == 4
    row = rank_responses("describe the small red fox in the forest . answer :",
                         ["the fox .", "the small red fox hunts in the forest ."], random.Random(0))
    assert set(row) == {"prompt", "responses", "ranks", "gold"}
