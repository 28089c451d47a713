"""The labeler: turns gold scores into noisy preferences, the way human raters disagree.

Pairs follow Bradley-Terry: P(a preferred over b) = sigmoid((gold_a - gold_b) / TEMPERATURE).
K-wise rankings follow Plackett-Luce with the same temperature: the best response is drawn
with probability proportional to exp(gold / TEMPERATURE), then the best of the rest, and so on.
Every draw comes from a `random.Random` seeded by the caller, so labels are reproducible.

"Close" pairs are defined by `disagreement_rate`: pairs whose |gold gap| is below the median
|gold gap| of the same set of pairs (pairs with exactly equal gold are left out, since no label
can disagree with gold there). TEMPERATURE is chosen so that 20-30% of labels on close pairs of
the world's own pairs (`tether.world.World.pairs`) disagree with gold; docs/world.md gives the
measured numbers.
"""

import math
import random
import statistics

from tether.world.judge import score

TEMPERATURE = 0.36


def prefer_probability(gold_a: float, gold_b: float, temperature: float = TEMPERATURE) -> float:
    """Gold scores of a and b -> probability that a rater prefers a (Bradley-Terry)."""
    z = (gold_a - gold_b) / temperature
    if z < -60:  # exp would overflow; the probability is 0 to double precision anyway
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))


def label_pair(prompt: str, a: str, b: str, rng: random.Random,
               temperature: float = TEMPERATURE) -> dict:
    """One pair -> {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}."""
    gold_a, gold_b = score(prompt, a), score(prompt, b)
    if rng.random() < prefer_probability(gold_a, gold_b, temperature):
        return {"prompt": prompt, "chosen": a, "rejected": b,
                "gold_chosen": gold_a, "gold_rejected": gold_b}
    return {"prompt": prompt, "chosen": b, "rejected": a,
            "gold_chosen": gold_b, "gold_rejected": gold_a}


def label_pairs(prompts: list[str], responses_a: list[str], responses_b: list[str],
                seed: int = 0, temperature: float = TEMPERATURE) -> list[dict]:
    """Three aligned lists (e.g. two samples of the SFT model per prompt) -> labelled rows.

    Each row is {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}: the format
    of pairs.jsonl. The same inputs and seed always give the same labels.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError("prompts, responses_a and responses_b must have the same length")
    rng = random.Random(f"label_pairs:{seed}")
    return [label_pair(p, a, b, rng, temperature)
            for p, a, b in zip(prompts, responses_a, responses_b)]


def rank(golds: list[float], rng: random.Random, temperature: float = TEMPERATURE) -> list[int]:
    """K gold scores -> ranks (0 = best), drawn by Plackett-Luce at `temperature`."""
    remaining = list(range(len(golds)))
    ranks = [0] * len(golds)
    for position in range(len(golds)):
        top = max(golds[i] for i in remaining)  # shift before exp, for stability
        weights = [math.exp((golds[i] - top) / temperature) for i in remaining]
        pick = rng.choices(remaining, weights=weights)[0]
        ranks[pick] = position
        remaining.remove(pick)
    return ranks


def rank_responses(prompt: str, responses: list[str], rng: random.Random,
                   temperature: float = TEMPERATURE) -> dict:
    """K responses -> {"prompt", "responses", "ranks", "gold"}: one row of rankings.jsonl."""
    golds = [score(prompt, r) for r in responses]
    return {"prompt": prompt, "responses": list(responses),
            "ranks": rank(golds, rng, temperature), "gold": golds}


def disagreement_rate(rows: list[dict]) -> dict:
    """Labelled pair rows (with gold_chosen, gold_rejected) -> how often labels contradict gold.

    Returns {"overall", "close", "median_gap", "n", "n_close"}: the share of rows whose chosen
    response has the lower gold score, over all rows with a nonzero gold gap and over the
    close ones, those whose |gap| is below the median |gap|.
    """
    gaps = [(r["gold_chosen"] - r["gold_rejected"]) for r in rows]
    gaps = [g for g in gaps if g != 0.0]
    if not gaps:
        raise ValueError("no rows with a nonzero gold gap")
    median = statistics.median(abs(g) for g in gaps)
    close = [g for g in gaps if abs(g) < median]
    return {
        "overall": sum(g < 0 for g in gaps) / len(gaps),
        "close": sum(g < 0 for g in close) / len(close) if close else float("nan"),
        "median_gap": median,
        "n": len(gaps),
        "n_close": len(close),
    }
