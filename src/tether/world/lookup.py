"""A multi-turn task in the world: a question that only a lookup tool can answer.

    what is the red fox ? answer :
        tell me about the red fox </s>           the policy calls the tool
        the red fox is big .                     the environment's observation
        big . </s>                               the policy answers

Each question's entity has a size drawn for that question alone (a column of its row), so no
model can know it: answering without the tool is a guess among five sizes (20%). A policy that
calls the tool with the question's entity and copies the size it is told answers right.
`LookupEnv` is the environment (`tether grpo --env tether.world.lookup:LookupEnv`), and
`NoToolEnv` the same questions with the tool taken away (every turn is the answer). The
demonstrations call the tool half of the time, so a model fine-tuned on them calls it about
half of the time; GRPO with the tool can learn to always call it.
"""

from __future__ import annotations

import random
from typing import Optional

from tether.envs.api import Environment
from tether.world import vocab
from tether.world.prompts import PROMPT_MARKER, split_of

QUESTION = "what is the {entity} ?"
CALL = "tell me about the"


def questions(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """n questions of one split: {"prompt", "entity", "size", "answer"}; prompts repeat (there
    are few entities), sizes are drawn per question."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    entities = [f"{c} {k}" for c in vocab.COLOURS for k in vocab.KINDS]
    pool = [e for e in entities if split_of(f"{QUESTION.format(entity=e)} {PROMPT_MARKER}") == split]
    rng = random.Random(f"lookup-{seed}-{split}")
    out = []
    for _ in range(n):
        entity, size = rng.choice(pool), rng.choice(vocab.SIZES)
        out.append({"prompt": f"{QUESTION.format(entity=entity)} {PROMPT_MARKER}", "entity": entity,
                    "size": size, "answer": f"{size} ."})
    return out


def demonstrations(n: int, tool_rate: float = 0.5, seed: int = 0) -> list[dict]:
    """SFT rows {"prompt", "completion"}: a share `tool_rate` calls the tool and answers with
    what it is told; the rest answer at once, with a guess."""
    rng = random.Random(f"lookup-demos-{seed}")
    rows = []
    for q in questions(n, "train", seed):
        if rng.random() < tool_rate:
            completion = f" {CALL} {q['entity']} </s> {observation(q['entity'], q['size'])} {q['answer']}"
        else:
            completion = f" {rng.choice(vocab.SIZES)} ."
        rows.append({"prompt": q["prompt"], "completion": completion})
    return rows


def observation(entity: str, size: str) -> str:
    return f"the {entity} is {size} ."


class LookupEnv(Environment):
    """The lookup tool: `tell me about the <colour> <kind>` is told that entity's size (the
    question's own from its row; any other's, a size fixed by the row and the entity); any
    other turn is the answer, paid 1.0 when it is exactly the row's answer."""

    tool = True

    def reset(self, row: dict) -> Optional[str]:
        self.row = row
        return None

    def step(self, action: str) -> tuple:
        words = action.split()
        if self.tool and " ".join(words[:4]) == CALL:
            entity = " ".join(words[4:])
            colour, _, kind = entity.partition(" ")
            if colour not in vocab.COLOURS or kind not in vocab.KINDS:
                return " what ?", None, False, {"tool_calls": 1, "tool_errors": 1}
            size = self.row["size"] if entity == self.row["entity"] else \
                random.Random(f"{self.row['prompt']}|{self.row['size']}|{entity}").choice(vocab.SIZES)
            return f" {observation(entity, size)}", None, False, {"tool_calls": 1, "tool_errors": 0}
        right = " ".join(words) == " ".join(self.row["answer"].split())
        return None, 1.0 if right else 0.0, True


class NoToolEnv(LookupEnv):
    """The same questions without the tool: the first turn is the answer."""

    tool = False
