"""The pretraining corpus: short stories that teach the language, and prompt -> response
exchanges of mixed quality that teach what a prompt is followed by.

`document(rng) -> str` writes one document of at most MAX_DOCUMENT_WORDS words
(each word is one token of the world tokenizer, so a document plus BOS/EOS fits in 100 tokens).
Exchanges only use training prompts, so held-out prompts never appear in pretraining.
"""

import random

from tether.world import vocab
from tether.world.prompts import Entity, Task, sample_prompts
from tether.world.responses import respond

MAX_DOCUMENT_WORDS = 96
STORY_SHARE = 0.4  # the rest of the documents are exchanges
# Exchanges in "the wild" are mostly decent but often flawed, so the base model learns the
# format and a plausible answer, not a perfect one: SFT and RLHF have work left to do.
CORPUS_QUALITIES = {
    "good": 0.55, "slightly_long": 0.07, "slightly_short": 0.06, "missing": 0.1,
    "wrong": 0.06, "short": 0.05, "long": 0.05, "repeat": 0.03, "off_topic": 0.03,
}


def _entity(rng: random.Random) -> Entity:
    return Entity(rng.choice(vocab.SIZES), rng.choice(vocab.COLOURS), rng.choice(vocab.KINDS))


def _about(e: Entity, p: str, rng: random.Random) -> str:
    """One sentence about an entity already introduced (it / the kind / its full name), in the
    story's place p: a story keeps its setting and its names, so the model learns to copy them."""
    v, v2 = rng.sample(vocab.KIND_VERBS[e.kind], 2)
    t, t2 = rng.sample(vocab.traits_for(e.kind), 2)
    adv = rng.choice(vocab.ADVERBS)
    return rng.choice((
        f"it {v} {adv} in the {p} .",
        f"the {e.kind} {v} and {v2} in the {p} .",
        f"then it {v} near the {p} .",
        f"it is {t} . it stays in the {p} .",
        f"the {e.kind} is very {t} .",
        f"the {e.kind} is {t} and {t2} .",
        f"then it {rng.choice(vocab.GENERIC_VERBS[1:])} by the {p} .",
        f"the {e.size} {e.colour} {e.kind} {v} in the {p} .",
    ))


def _intro(e: Entity, place: str, rng: random.Random) -> str:
    v = rng.choice(vocab.KIND_VERBS[e.kind])
    return rng.choice((
        f"there is a {e.size} {e.colour} {e.kind} in the {place} .",
        f"the {e.size} {e.colour} {e.kind} lives in the {place} .",
        f"in the {place} , the {e.size} {e.colour} {e.kind} {v} .",
    ))


def _meeting(a: Entity, b: Entity, rng: random.Random) -> str:
    """A sentence that brings in a second entity and relates it to the first."""
    cmp = "bigger" if vocab.SIZE_RANK[a.size] > vocab.SIZE_RANK[b.size] else "smaller"
    if a.size == b.size:
        return f"the {a.kind} {rng.choice(vocab.KIND_VERBS[a.kind])} near the {b.size} {b.colour} {b.kind} ."
    return f"the {a.size} {a.kind} is {cmp} than the {b.size} {b.colour} {b.kind} ."


def _name_subject(sentence: str, e: Entity) -> str:
    """Replace the first "it" by "the <kind>", so a second entity is never an ambiguous "it"."""
    words = sentence.split()
    if "it" in words:
        i = words.index("it")
        words[i : i + 1] = ["the", e.kind]
    return " ".join(words)


def story(rng: random.Random) -> str:
    """A short story (3 to 6 sentences) about one or two entities."""
    a, place = _entity(rng), rng.choice(vocab.PLACES)
    sentences = [_intro(a, place, rng)]
    sentences += [_about(a, place, rng) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.5:
        b = _entity(rng)
        while b.kind == a.kind:
            b = _entity(rng)
        sentences.append(_meeting(a, b, rng))
        sentences.append(_name_subject(_about(b, place, rng), b))
    return " ".join(dict.fromkeys(sentences))  # drop exact repeats, keep order


def exchange(prompt: str, task: Task, rng: random.Random) -> str:
    """A prompt followed by a response of random quality (CORPUS_QUALITIES)."""
    quality = rng.choices(list(CORPUS_QUALITIES), weights=list(CORPUS_QUALITIES.values()))[0]
    return f"{prompt} {respond(task, quality, rng)}"


def document(rng: random.Random) -> str:
    """One pretraining document: a story, or one to three exchanges on training prompts."""
    if rng.random() < STORY_SHARE:
        return story(rng)
    parts: list[str] = []
    for _ in range(rng.randint(1, 3)):
        part = exchange(*sample_prompts(rng, 1, "train")[0], rng)
        if parts and len(" ".join(parts + [part]).split()) > MAX_DOCUMENT_WORDS:
            break
        parts.append(part)
    return " ".join(parts)
