"""Candidates to label: a prompt and K >= 2 responses, read from any of the formats people have.

    {"prompt", "responses": [K]}                 K responses to rank (optional "ranks": labels
                                                 already given, e.g. a file tether label wrote)
    {"prompt", "chosen", "rejected"}             a pair whose order is not trusted (tether bon's
                                                 pairs.jsonl, world or hub preference data): it is
                                                 shown in random order and relabelled
    {"prompt", "a", "b"}                         two policies side by side (tether eval's JSON,
                                                 whose "samples" list has these keys)
    {"prompt", "response_a", "response_b"}       an unlabelled pair, as arena-style data gives it

Any of them may be conversational, as TRL's preference data is: `prompt` a list of {"role",
"content"} messages, and a response a string or one assistant message in a list (tether bon's
pairs from chat prompts). The item keeps the messages as its prompt, and every file written from
it (labels, items left for people) keeps them too; a response is kept as its text.

Every format becomes an `Item`. Its key hashes the prompt and the set of responses, so the same
comparison has the same key whatever order the file gave it in, and labels find their item again
after a restart. The ranks a row already carries (chosen over rejected, or "ranks") are kept as
`given`, for agreement figures; they are never shown to a rater.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Optional

from tether.data.io import LINE, load_rows
from tether.data.preference import assistant_text, is_messages
from tether.data.prompts import Prompt
from tether.errors import DataError

log = logging.getLogger("tether")


@dataclass(frozen=True)
class Item:
    key: str
    prompt: Prompt  # a string, or a conversation's messages
    responses: tuple[str, ...]
    sources: tuple[str, ...]  # who wrote each response: ("a", "b") for two policies, else ()
    given: Optional[tuple[int, ...]]  # ranks the input already held (0 = best), or None
    where: str  # file:line

    @property
    def k(self) -> int:
        return len(self.responses)

    @property
    def chat(self) -> bool:
        """The prompt is a conversation (a list of messages)."""
        return not isinstance(self.prompt, str)


def item_key(prompt: Prompt, responses: list[str] | tuple[str, ...]) -> str:
    """The same prompt and responses in any order -> the same key (a conversation's messages
    with their keys in any order, too)."""
    blob = json.dumps([prompt, sorted(responses)], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _text(value, column: str, where: str) -> str:
    """A response's text: a string, or one assistant message in a list (TRL's conversational
    form)."""
    value = assistant_text(value)
    if not isinstance(value, str):
        kind = "nothing" if value is None else type(value).__name__
        raise DataError(f"{where}: column {column!r} must be a string (or one assistant message), "
                        f"found {kind}")
    return value


def _prompt(value, where: str) -> Prompt:
    if is_messages(value):
        return list(value)
    if not isinstance(value, str):
        kind = "nothing" if value is None else type(value).__name__
        raise DataError(f"{where}: column 'prompt' must be a string or a list of {{role, content}} "
                        f"messages, found {kind}")
    return value


def _parse(raw: dict, where: str) -> tuple[list[str], tuple[str, ...], Optional[tuple[int, ...]]]:
    if raw.get("responses") is not None:
        responses = raw["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{where}: 'responses' must be a list of at least 2 strings")
        responses = [_text(r, f"responses[{i}]", where) for i, r in enumerate(responses)]
        ranks = raw.get("ranks")
        given = None
        if ranks is not None:
            if (not isinstance(ranks, list) or len(ranks) != len(responses)
                    or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
                raise DataError(f"{where}: 'ranks' must hold one non-negative integer per response")
            given = tuple(ranks) if raw.get("decision") != "skip" else None
        sources = raw.get("sources")
        sources = tuple(str(s) for s in sources) if isinstance(sources, list) and len(sources) == len(responses) else ()
        return responses, sources, given
    if raw.get("chosen") is not None or raw.get("rejected") is not None:
        return ([_text(raw.get("chosen"), "chosen", where), _text(raw.get("rejected"), "rejected", where)],
                (), (0, 1))
    if raw.get("a") is not None or raw.get("b") is not None:
        return [_text(raw.get("a"), "a", where), _text(raw.get("b"), "b", where)], ("a", "b"), None
    if raw.get("response_a") is not None or raw.get("response_b") is not None:  # arena-style pairs
        return ([_text(raw.get("response_a"), "response_a", where),
                 _text(raw.get("response_b"), "response_b", where)], (), None)
    raise DataError(f"{where}: no responses to compare; give 'responses' (a list), 'chosen' and "
                    "'rejected', 'a' and 'b', or 'response_a' and 'response_b' beside 'prompt'")


def read_items(source: str) -> list[Item]:
    """Every comparable item of `source`, in file order. Rows whose responses are all the same
    text cannot be compared and are skipped (counted in a log line); a repeated comparison is
    kept once. A malformed row raises DataError naming the file and line; so does a file with
    nothing to compare."""
    ds = load_rows(source)
    columns = sorted(set(ds.column_names) - {LINE})
    if "prompt" not in columns:
        raise DataError(f"{source} has no 'prompt' column; found columns: {', '.join(columns) or '(none)'}")
    items, seen, same = [], set(), 0
    for i, raw in enumerate(ds):
        where = f"{source}{raw.get(LINE) or f' row {i + 1}'}"
        prompt = _prompt(raw.get("prompt"), where)
        responses, sources, given = _parse(raw, where)
        if len(set(responses)) < 2:
            same += 1
            continue
        key = item_key(prompt, responses)
        if key in seen:
            continue
        seen.add(key)
        items.append(Item(key, prompt, tuple(responses), sources, given, where))
    if same:
        log.info("%s: %d row(s) skipped: their responses are all the same text", source, same)
    if not items:
        raise DataError(f"{source}: nothing to compare ({len(ds)} row(s), none with two different responses)")
    return items
