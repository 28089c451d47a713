"""Prompts: the four tasks, how a prompt is written and read back, and the train/held-out split.

A prompt is an instruction about one or two entities, followed by the marker `` answer :``::

    describe the small red fox in the forest . answer :
    what does the huge grey whale do ? answer :
    compare the tiny ant and the big horse . answer :
    continue the story : the tiny green frog croaks in the pond . answer :

`Task` is the parsed meaning of a prompt; the judge reads it back with `parse_prompt`, so
the judge needs nothing but the prompt string. `split_of` assigns a prompt to "train" or
"eval" by a hash of its text, so the split never depends on the seed or on sampling order.
"""

import hashlib
import random
from dataclasses import dataclass

from tether.world import vocab

PROMPT_MARKER = "answer :"
EVAL_PERCENT = 10  # share of the prompt space held out for evaluation

TASK_WEIGHTS = {"describe": 0.3, "action": 0.3, "compare": 0.2, "continue": 0.2}

# Two phrasings per task, so the model must read the entities, not memorise one string.
TEMPLATES = {
    "describe": (
        "describe the {s} {c} {k} in the {p} .",
        "tell me about the {s} {c} {k} in the {p} .",
    ),
    "action": (
        "what does the {s} {c} {k} do ?",
        "what can the {s} {c} {k} do ?",
    ),
    "compare": (
        "compare the {s} {k} and the {s2} {k2} .",
        "which is bigger , the {s} {k} or the {s2} {k2} ?",
    ),
    "continue": (
        "continue the story : the {s} {c} {k} {v} in the {p} .",
        "what happens next : the {s} {c} {k} {v} in the {p} .",
    ),
}


@dataclass(frozen=True)
class Entity:
    """One thing a prompt is about. `colour` is None where the prompt gives none."""

    size: str
    colour: str | None
    kind: str


@dataclass(frozen=True)
class Task:
    """The meaning of a prompt.

    name: "describe" | "action" | "compare" | "continue" | "generic" (a prompt the world
    did not write; the judge then only checks that its detail words are used).
    entities: one entity, or two for "compare".
    place: the place named in the prompt, if any. verb: the verb of a "continue" story.
    prompt_words: every word of the prompt, for the generic fallback.
    """

    name: str
    entities: tuple[Entity, ...]
    place: str | None = None
    verb: str | None = None
    prompt_words: tuple[str, ...] = ()


def sample_task(rng: random.Random) -> Task:
    """Draw a random task (any split) from the world's prompt space."""
    name = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    kind = rng.choice(vocab.KINDS)
    first = Entity(rng.choice(vocab.SIZES), rng.choice(vocab.COLOURS), kind)
    if name == "compare":
        kind2 = rng.choice([k for k in vocab.KINDS if k != kind])
        size, size2 = rng.sample(vocab.SIZES, 2)
        return Task(name, (Entity(size, None, kind), Entity(size2, None, kind2)))
    if name == "action":
        return Task(name, (first,))
    place = rng.choice(vocab.PLACES)
    verb = rng.choice(vocab.KIND_VERBS[kind]) if name == "continue" else None
    return Task(name, (first,), place=place, verb=verb)


def write_prompt(task: Task, rng: random.Random) -> str:
    """Task -> prompt text in one of its phrasings, ending with the marker."""
    e = task.entities[0]
    fields = {"s": e.size, "c": e.colour, "k": e.kind, "p": task.place, "v": task.verb}
    if len(task.entities) > 1:
        fields.update(s2=task.entities[1].size, k2=task.entities[1].kind)
    body = rng.choice(TEMPLATES[task.name]).format(**fields)
    return f"{body} {PROMPT_MARKER}"


def _task_name(words: list[str]) -> str:
    if words[:1] in (["describe"], ["tell"]):
        return "describe"
    if words[:2] == ["what", "happens"] or words[:1] == ["continue"]:
        return "continue"
    if words[:1] == ["what"]:
        return "action"
    if words[:1] in (["compare"], ["which"]):
        return "compare"
    return "generic"


def parse_prompt(prompt: str) -> Task:
    """Prompt text -> Task. Never fails: unknown prompts give a "generic" task."""
    words = prompt.split()
    name = _task_name(words)
    by_tag: dict[str, list[str]] = {}
    for word in words:
        by_tag.setdefault(vocab.tag_of(word), []).append(word)
    sizes, colours = by_tag.get("SIZE", []), by_tag.get("COLOUR", [])
    kinds, places = by_tag.get("KIND", []), by_tag.get("PLACE", [])
    verbs = by_tag.get("VERB", [])
    wanted = {"describe": (1, 1, 1), "action": (1, 1, 1), "continue": (1, 1, 1), "compare": (2, 0, 2)}
    n_sizes, n_colours, n_kinds = wanted.get(name, (-1, -1, -1))
    if (len(sizes), len(colours), len(kinds)) != (n_sizes, n_colours, n_kinds):
        return Task("generic", (), prompt_words=tuple(words))
    if name == "compare":
        entities = tuple(Entity(s, None, k) for s, k in zip(sizes, kinds))
        return Task(name, entities, prompt_words=tuple(words))
    entity = Entity(sizes[0], colours[0], kinds[0])
    return Task(
        name,
        (entity,),
        place=places[0] if places else None,
        verb=verbs[0] if verbs else None,
        prompt_words=tuple(words),
    )


def split_of(prompt: str) -> str:
    """Prompt text -> "train" or "eval", by a stable hash (sha256) of the text."""
    bucket = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def sample_prompts(rng: random.Random, n: int, split: str) -> list[tuple[str, Task]]:
    """Draw n distinct prompts of one split ("train" or "eval") -> [(prompt, task)]."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    seen: set[str] = set()
    out: list[tuple[str, Task]] = []
    while len(out) < n:
        task = sample_task(rng)
        prompt = write_prompt(task, rng)
        if prompt not in seen and split_of(prompt) == split:
            seen.add(prompt)
            out.append((prompt, task))
    return out
