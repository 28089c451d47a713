"""Win rates with confidence intervals, and text diversity. Pure Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class WinRate:
    rate: float  # wins + ties/2, over comparisons
    low: float  # 95% confidence interval
    high: float
    wins: int
    ties: int
    losses: int

    def as_dict(self) -> dict:
        return {"win_rate": self.rate, "ci95_low": self.low, "ci95_high": self.high,
                "wins": self.wins, "ties": self.ties, "losses": self.losses}


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tie_tol: float = 1e-9) -> WinRate:
    """How often A beats B on paired comparisons, ties counted as half a win.

    The 95% interval is Wilson's score interval on the (tie-adjusted) win proportion; it stays
    inside [0, 1] and behaves at rates near 0 or 1, unlike the normal approximation.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = sum(a > b + tie_tol for a, b in zip(scores_a, scores_b))
    losses = sum(b > a + tie_tol for a, b in zip(scores_a, scores_b))
    ties = len(scores_a) - wins - losses
    n = len(scores_a)
    p = (wins + 0.5 * ties) / n
    low, high = wilson_interval(p, n)
    return WinRate(p, low, high, wins, ties, losses)


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval always holds p; at p = 0 or 1 rounding would leave it a hair outside.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams / all n-grams over whitespace tokens of all texts (0 when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
