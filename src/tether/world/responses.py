"""Responses to a task, at a chosen quality: the world's demonstrators and its bad writers.

`respond(task, quality, rng) -> str` writes one response. Qualities:

- "good": fluent, one or two sentences, every asked-for detail right;
- mild faults, as in real demonstrations: "slightly_long" (one or two extra sentences),
  "slightly_short" (the first clause only), "stutter" (one word said twice);
- clear faults: "missing" (drops an asked-for detail), "wrong" (a detail contradicts the
  prompt), "short" (two to four words), "long" (a ramble past the length band),
  "repeat" (a sentence said twice), "off_topic" (answers another prompt), "salad" (the
  words of a good answer shuffled).

Responses are plain world text (no marker, no EOS), e.g. ``the small red fox hunts in the
forest . it is shy .``. Which of these faults the judge punishes, and how hard, lives in
`tether.world.judge`; this module only writes them.
"""

import random

from tether.world import vocab
from tether.world.prompts import Entity, Task, sample_task

QUALITIES = (
    "good", "slightly_long", "slightly_short", "stutter",
    "missing", "wrong", "short", "long", "repeat", "off_topic", "salad",
)


def _pick(rng: random.Random, options, avoid=()) -> str:
    return rng.choice([o for o in options if o not in avoid])


def _np(e: Entity) -> str:
    return " ".join(w for w in ("the", e.size, e.colour, e.kind) if w)


def _comparative(first: Entity, second: Entity) -> str:
    """The comparison word that makes "first is ___ than second" true."""
    return "bigger" if vocab.SIZE_RANK[first.size] > vocab.SIZE_RANK[second.size] else "smaller"


def _good_describe(task: Task, rng: random.Random) -> str:
    e, p = task.entities[0], task.place
    s, c, k = e.size, e.colour, e.kind
    v, adv = rng.choice(vocab.KIND_VERBS[k]), rng.choice(vocab.ADVERBS)
    t, t2 = rng.sample(vocab.traits_for(k), 2)
    return rng.choice((
        f"the {s} {c} {k} lives in the {p} . it is {t} .",
        f"the {s} {c} {k} {v} in the {p} . it is {t} and {t2} .",
        f"the {s} {c} {k} {v} {adv} in the {p} .",
        f"the {s} {c} {k} is {t} . it {v} in the {p} .",
        f"there is a {s} {c} {k} in the {p} . it {v} {adv} .",
        f"in the {p} , the {s} {c} {k} {v} {adv} .",
    ))


def _good_action(task: Task, rng: random.Random) -> str:
    e = task.entities[0]
    v, v2 = rng.sample(vocab.KIND_VERBS[e.kind], 2)
    adv, p = rng.choice(vocab.ADVERBS), rng.choice(vocab.PLACES)
    t = rng.choice(vocab.traits_for(e.kind))
    return rng.choice((
        f"{_np(e)} {v} {adv} .",
        f"{_np(e)} {v} and {v2} .",
        f"{_np(e)} {v} in the {p} . it is {t} .",
        f"{_np(e)} is {t} . it {v} {adv} .",
    ))


def _good_compare(task: Task, rng: random.Random) -> str:
    a, b = task.entities
    claim = f"{_np(a)} is {_comparative(a, b)} than {_np(b)} ."
    va, vb = rng.choice(vocab.KIND_VERBS[a.kind]), rng.choice(vocab.KIND_VERBS[b.kind])
    adv = rng.choice(vocab.ADVERBS)
    return rng.choice((
        claim,
        f"{claim} the {b.kind} {vb} {adv} .",
        f"{claim} it {va} .",
        f"{claim} it {va} {adv} .",
    ))


def _good_continue(task: Task, rng: random.Random) -> str:
    e = task.entities[0]
    v2, *rest = rng.sample([v for v in vocab.KIND_VERBS[e.kind] if v != task.verb], 2)
    adv, p2 = rng.choice(vocab.ADVERBS), _pick(rng, vocab.PLACES, avoid=(task.place,))
    t = rng.choice(vocab.traits_for(e.kind))
    return rng.choice((
        f"then the {e.kind} {v2} near the {p2} .",
        f"then the {e.kind} {v2} {adv} . it is {t} .",
        f"then it {v2} {adv} . it rests by the {p2} .",
        f"then it {v2} and {rest[0]} .",
    ))


GOOD_WRITERS = {
    "describe": _good_describe,
    "action": _good_action,
    "compare": _good_compare,
    "continue": _good_continue,
}


def good_response(task: Task, rng: random.Random) -> str:
    """Task -> a correct, fluent response of one or two sentences."""
    return GOOD_WRITERS[task.name](task, rng)


def _fillers(task: Task, rng: random.Random) -> list[str]:
    """On-topic, fluent sentences that add length and nothing the task asked for."""
    kind = task.entities[0].kind
    traits = rng.sample(vocab.traits_for(kind), 3)
    generic = rng.sample(("rests", "stays"), 2)
    advs = rng.sample(vocab.ADVERBS, 2)
    place = task.place or rng.choice(vocab.PLACES)
    out = [
        f"it is very {traits[0]} .",
        f"it {generic[0]} {advs[0]} .",
        f"it is {traits[1]} and {traits[2]} .",
        f"then it {generic[1]} {advs[1]} .",
        f"then it waits by the {place} .",
    ]
    rng.shuffle(out)
    return out


def _swap_word(text: str, old: str, new: str) -> str:
    return " ".join(new if w == old else w for w in text.split())


def _drop_place(words: list[str], place: str) -> list[str]:
    """Remove "in/near/by the PLACE" (and a comma after it) from a word list."""
    if place not in words:
        return words
    i = words.index(place)
    if i >= 2 and words[i - 2] in vocab.PREPOSITIONS:
        end = i + 2 if i + 1 < len(words) and words[i + 1] == "," else i + 1
        return words[: i - 2] + words[end:]
    return words


def _missing(task: Task, good: str, rng: random.Random) -> str:
    e = task.entities[0]
    if task.name == "action":
        generic = rng.choice(vocab.GENERIC_VERBS[1:])
        return " ".join(generic if w in vocab.KIND_VERBS[e.kind] else w for w in good.split())
    if task.name == "continue":
        return f"then it rests near the {_pick(rng, vocab.PLACES, avoid=(task.place,))} ."
    if task.name == "compare":
        a, b = task.entities
        if rng.random() < 0.5:
            return f"{_np(a)} waits near {_np(b)} ."
        dropped = rng.choice((a.size, b.size))
        return " ".join(w for w in good.split() if w != dropped)
    drop = rng.choice(("size", "colour", "place"))
    if drop == "place":
        return " ".join(_drop_place(good.split(), task.place))
    target = e.size if drop == "size" else e.colour
    return " ".join(w for w in good.split() if w != target)


def _wrong(task: Task, good: str, rng: random.Random) -> str:
    e = task.entities[0]
    if task.name == "compare":
        if "bigger" in good.split():
            return _swap_word(good, "bigger", "smaller")
        return _swap_word(good, "smaller", "bigger")
    if task.name in ("action", "continue"):
        fitting = vocab.KIND_VERBS[e.kind]
        if task.name == "continue" or rng.random() < 0.7:
            bad = _pick(rng, vocab.SPECIFIC_VERBS, avoid=fitting)
            return " ".join(bad if w in fitting else w for w in good.split())
    if e.colour and e.colour in good.split() and rng.random() < 0.5:
        return _swap_word(good, e.colour, _pick(rng, vocab.COLOURS, avoid=(e.colour,)))
    if task.place and task.place in good.split() and rng.random() < 0.5:
        return _swap_word(good, task.place, _pick(rng, vocab.PLACES, avoid=(task.place,)))
    return _swap_word(good, e.size, _pick(rng, vocab.SIZES, avoid=(e.size,)))


def _short(task: Task, rng: random.Random) -> str:
    e = task.entities[0]
    v = _pick(rng, vocab.KIND_VERBS[e.kind], avoid=(task.verb,))
    if task.name == "describe":
        return rng.choice((f"the {e.kind} .", f"a {e.colour} {e.kind} ."))
    if task.name == "action":
        return rng.choice((f"it {v} .", f"the {e.kind} ."))
    if task.name == "compare":
        return rng.choice((f"the {e.kind} .", f"the {e.kind} and the {task.entities[1].kind} ."))
    return rng.choice((f"it {v} .", "then it rests ."))


def _trim(good: str) -> str:
    """A good response cut down: its first sentence if that is long enough, else no adverbs."""
    first = good.split(" . ")[0].removesuffix(" .") + " ."
    if first != good and len(first.split()) >= 5:
        return first
    return " ".join(w for w in good.split() if vocab.tag_of(w) != "ADV")


def _stutter(good: str, rng: random.Random) -> str:
    words = good.split()
    i = rng.choice([i for i, w in enumerate(words) if w not in vocab.FUNCTION_WORDS])
    return " ".join(words[: i + 1] + words[i:])


def _repeat(good: str) -> str:
    first = good.split(" . ")[0].removesuffix(" .")
    return f"{first} . {good}"


def _salad(good: str, rng: random.Random) -> str:
    words = [w for w in good.split() if w != "."]
    rng.shuffle(words)
    return " ".join(words + ["."])


def _related(a: Task, b: Task) -> bool:
    """Whether two tasks share a kind or a fitting verb (then one cannot be off-topic)."""
    return any(
        x.kind == y.kind or set(vocab.KIND_VERBS[x.kind]) & set(vocab.KIND_VERBS[y.kind])
        for x in a.entities
        for y in b.entities
    )


def respond(task: Task, quality: str, rng: random.Random) -> str:
    """Task, one of QUALITIES, rng -> a response of that quality (plain world text)."""
    good = good_response(task, rng)
    if quality == "good":
        return good
    if quality in ("slightly_long", "long"):
        n_extra = rng.randint(1, 2) if quality == "slightly_long" else rng.randint(3, 5)
        return " ".join([good] + _fillers(task, rng)[:n_extra])
    if quality == "slightly_short":
        return _trim(good)
    if quality == "stutter":
        return _stutter(good, rng)
    if quality == "missing":
        return _missing(task, good, rng)
    if quality == "wrong":
        return _wrong(task, good, rng)
    if quality == "short":
        return _short(task, rng)
    if quality == "repeat":
        return _repeat(good)
    if quality == "off_topic":
        other = sample_task(rng)
        while other.name != task.name or _related(other, task):
            other = sample_task(rng)
        return good_response(other, rng)
    if quality == "salad":
        return _salad(good, rng)
    raise ValueError(f"unknown quality {quality!r}; expected one of {QUALITIES}")
