"""A verifiable task in the world: a question with one exact answer.

    which is smaller , the big brown dog or the tiny green ant ? answer :   ->   the tiny green ant .

The two entities have different sizes (tiny < small < medium < big < huge), so exactly one
answer is right, and a reward function can check it without a judge
(`tether.world.quiz_reward.exact_match`, which `tether grpo --reward-fn` reads). The
demonstrations pick the wrong entity at `error_rate`, so a model fine-tuned on them answers right
only some of the time: room for GRPO to improve on, measured as exact match on held-out
questions. Held-out questions never appear in training (`prompts.split_of`).
"""

from __future__ import annotations

import random

from tether.world import vocab
from tether.world.prompts import PROMPT_MARKER, split_of

QUESTION = "which is smaller , the {a} or the {b} ?"


def _entity(rng: random.Random, size: str, kind: str) -> str:
    return f"{size} {rng.choice(vocab.COLOURS)} {kind}"


def questions(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """n distinct questions of one split: {"prompt", "answer", "wrong"}."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"quiz-{seed}-{split}")
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        kind, kind2 = rng.sample(vocab.KINDS, 2)
        size, size2 = rng.sample(vocab.SIZES, 2)
        a, b = _entity(rng, size, kind), _entity(rng, size2, kind2)
        prompt = f"{QUESTION.format(a=a, b=b)} {PROMPT_MARKER}"
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        small, large = (a, b) if vocab.SIZE_RANK[size] < vocab.SIZE_RANK[size2] else (b, a)
        out.append({"prompt": prompt, "answer": f"the {small} .", "wrong": f"the {large} ."})
    return out


def demonstrations(n: int, error_rate: float = 0.4, seed: int = 0) -> list[dict]:
    """SFT rows {"prompt", "completion"} for training questions; a share `error_rate` of them
    answers with the wrong (bigger) entity."""
    rng = random.Random(f"quiz-demos-{seed}")
    rows = []
    for q in questions(n, "train", seed):
        answer = q["wrong"] if rng.random() < error_rate else q["answer"]
        rows.append({"prompt": q["prompt"], "completion": f" {answer}"})
    return rows
