"""The gold judge: the world's stand-in for a human rater, `score(prompt, response) -> float`.

The score adds five criteria that pull against each other (weights are the constants below):

    gold = TASK_WEIGHT * task + detail + fluency - repetition - length_penalty,
    floored at SCORE_FLOOR

- task in [-3.4, 1]: the weighted share of the asked-for details the response gets right
  (`coverage`), minus WRONG_COST for each detail that contradicts the prompt (another colour,
  another kind, a verb that does not fit, a false comparison), counting at most MAX_WRONG.
  An answer with none of the asked-for details (off topic) loses OFF_TOPIC_COST more.
- fluency in [FLUENCY_FLOOR, FLUENCY_MAX]: FLUENCY_MAX minus ILLEGAL_COST for each pair of
  neighbouring words whose word classes the grammar does not allow (`vocab.LEGAL_NEXT`),
  including a response that does not end with ".".
- detail in [0, DETAIL_VALUE * DETAIL_CAP]: DETAIL_VALUE for each distinct trait or adverb
  ("shy", "quickly"), up to DETAIL_CAP of them: raters like an informative answer. Stacking
  more buys nothing and soon costs length and repetition.
- repetition in [0, REPEAT_CAP]: REPEAT_COST per repeat event: a word said twice in a row, a
  content word said a third time, a 3-word phrase with two content words said again, a whole
  sentence said again (two events), or, for a "continue" task, a phrase copied from the story.
- length_penalty: SHORT_COST per word below LENGTH_BAND, LONG_COST per word above it (capped).
  Inside the band length does not matter: two good answers of different length tie, as
  raters are mostly indifferent there, and a tie is better than a made-up preference.

A correct, fluent answer within the length band scores TASK_WEIGHT + FLUENCY_MAX = 1 plus
DETAIL_VALUE per trait or adverb, at most SCORE_MAX = 2.4; an empty one -1.6; off-topic or
word-salad answers land near 0 or below. Everything the judge looks at is visible
on the surface (which words, how often, which neighbours, how many), but not all of it is
equally easy to learn from preferences: a small reward model learns the response-only criteria
and misses faithfulness to the prompt, which is also how it gets gamed (docs/world.md).
"""

import collections
import functools
from dataclasses import dataclass

from tether.world import vocab
from tether.world.prompts import Task, parse_prompt

TASK_WEIGHT = 0.5
OFF_TOPIC_COST = 1.0
DETAIL_VALUE = 0.35
DETAIL_CAP = 4
WRONG_COST = 0.8
MAX_WRONG = 3
FLUENCY_MAX = 0.5
ILLEGAL_COST = 0.35
FLUENCY_FLOOR = -1.5
REPEAT_COST = 0.4
REPEAT_CAP = 1.6
LENGTH_BAND = (5, 20)
SHORT_COST = 0.25
LONG_COST = 0.15
LONG_CAP = 1.5
SCORE_FLOOR = -2.0
SCORE_MAX = TASK_WEIGHT + DETAIL_VALUE * DETAIL_CAP + FLUENCY_MAX
DETAIL_WORDS = frozenset(vocab.ANIMAL_TRAITS + vocab.OBJECT_TRAITS + vocab.ADVERBS)


@dataclass(frozen=True)
class Verdict:
    """Every part of one gold score, for reports and tests."""

    score: float
    coverage: float  # weighted share of asked-for details present, in [0, 1]
    wrong: int  # details that contradict the prompt
    illegal: int  # ungrammatical neighbour pairs
    repeats: int  # repeat events
    length: int  # words, punctuation included
    details: int  # distinct traits and adverbs (counted up to DETAIL_CAP)


def _comparisons(words: list[str], task: Task) -> tuple[int, int]:
    """Count (true, false) "X is bigger/smaller than Y" claims about the two entities."""
    by_kind = {e.kind: e for e in task.entities}
    right = wrong = 0
    for i, word in enumerate(words):
        if vocab.tag_of(word) != "CMP":
            continue
        before = [w for w in words[:i] if w in by_kind]
        after = [w for w in words[i + 1 :] if w in by_kind]
        if not before or not after or before[-1] == after[0]:
            continue
        subject, other = by_kind[before[-1]], by_kind[after[0]]
        bigger = vocab.SIZE_RANK[subject.size] > vocab.SIZE_RANK[other.size]
        if (word == "bigger") == bigger:
            right += 1
        else:
            wrong += 1
    return right, wrong


def _requirements(task: Task) -> list[tuple[float, frozenset[str]]]:
    """Task -> [(weight, words any one of which satisfies the item)]."""
    if task.name == "generic":
        details = ("SIZE", "COLOUR", "KIND", "PLACE")
        return [(1.0, frozenset([w])) for w in task.prompt_words if vocab.tag_of(w) in details]
    e = task.entities[0]
    fitting = frozenset(vocab.KIND_VERBS[e.kind])
    if task.name == "describe":
        return [(1.0, frozenset([w])) for w in (e.size, e.colour, e.kind, task.place)]
    if task.name == "action":
        return [(1.0, frozenset([e.kind])), (0.5, frozenset([e.size])),
                (0.5, frozenset([e.colour])), (2.0, fitting)]
    if task.name == "continue":
        return [(1.0, frozenset(["it", e.kind])), (2.0, fitting - {task.verb})]
    b = task.entities[1]
    return [(1.0, frozenset([e.kind])), (1.0, frozenset([b.kind])),
            (0.5, frozenset([e.size])), (0.5, frozenset([b.size]))]


def _coverage_and_wrong(words: list[str], task: Task) -> tuple[float, int]:
    present = set(words)
    items = _requirements(task)
    got = sum(w for w, ok in items if present & ok)
    total = sum(w for w, _ in items)
    wrong = 0
    if task.name == "compare":
        right, false = _comparisons(words, task)
        got, total, wrong = got + 2.0 * (right > 0), total + 2.0, false
    if task.name != "generic":
        wrong += len(_contradictions(present, task))
    return (got / total if total else 1.0), wrong


def _contradictions(present: set[str], task: Task) -> set[str]:
    """Detail words in the response that the prompt's entities rule out."""
    given = {
        "SIZE": {e.size for e in task.entities},
        "COLOUR": {e.colour for e in task.entities if e.colour},
        "KIND": {e.kind for e in task.entities},
        "PLACE": {task.place} if task.name == "describe" else set(),
    }
    fitting = {v for e in task.entities for v in vocab.KIND_VERBS[e.kind]}
    out = set()
    for word in present:
        tag = vocab.tag_of(word)
        if given.get(tag) and word not in given[tag]:
            out.add(word)
        elif tag == "VERB" and word in vocab.SPECIFIC_VERBS and word not in fitting:
            out.add(word)
    return out


def _illegal_pairs(words: list[str]) -> int:
    tags = ["START"] + [vocab.tag_of(w) for w in words] + ["END"]
    return sum(b not in vocab.LEGAL_NEXT.get(a, ()) for a, b in zip(tags, tags[1:]))


def _content_trigrams(words: list[str]) -> list[tuple[str, ...]]:
    content = [w not in vocab.FUNCTION_WORDS for w in words]
    return [
        (words[i], words[i + 1], words[i + 2])
        for i in range(len(words) - 2)
        if content[i] + content[i + 1] + content[i + 2] >= 2
    ]


def _repeat_events(words: list[str], task: Task) -> int:
    events = sum(a == b for a, b in zip(words, words[1:]))
    counts = collections.Counter(w for w in words if w not in vocab.FUNCTION_WORDS)
    events += sum(c - 2 for c in counts.values() if c > 2)
    grams = _content_trigrams(words)
    events += len(grams) - len(set(grams))
    sentences = [line.strip() for line in " ".join(words).replace(" .", " .\n").splitlines()]
    events += 2 * (len(sentences) - len(set(sentences)))  # a sentence said twice is glaring
    if task.name == "continue":
        story = set(_content_trigrams(list(task.prompt_words)))
        events += sum(g in story for g in grams)
    return events


def _length_penalty(n: int) -> float:
    low, high = LENGTH_BAND
    if n < low:
        return SHORT_COST * (low - n)
    if n > high:
        return min(LONG_CAP, LONG_COST * (n - high))
    return 0.0


@functools.lru_cache(maxsize=1 << 16)  # pairs and rankings score each response more than once
def judge(prompt: str, response: str) -> Verdict:
    """(prompt, response) -> Verdict with the gold score and each of its parts."""
    task = parse_prompt(prompt)
    words = response.split()
    coverage, wrong = _coverage_and_wrong(words, task)
    task_score = coverage - WRONG_COST * min(wrong, MAX_WRONG) - OFF_TOPIC_COST * (coverage == 0)
    details = len(DETAIL_WORDS.intersection(words))
    illegal = _illegal_pairs(words)
    fluency = max(FLUENCY_FLOOR, FLUENCY_MAX - ILLEGAL_COST * illegal)
    repeats = _repeat_events(words, task)
    repetition = min(REPEAT_CAP, REPEAT_COST * repeats)
    detail = DETAIL_VALUE * min(details, DETAIL_CAP)
    total = TASK_WEIGHT * task_score + detail + fluency - repetition - _length_penalty(len(words))
    return Verdict(max(SCORE_FLOOR, round(total, 6)), coverage, wrong, illegal, repeats, len(words),
                   details)


def score(prompt: str, response: str) -> float:
    """(prompt, response) -> gold score, a float in [SCORE_FLOOR, SCORE_MAX]. Deterministic."""
    return judge(prompt, response).score

