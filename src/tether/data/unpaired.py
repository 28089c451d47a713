"""Unpaired feedback for KTO: each example is one response to one prompt, labelled desirable or
undesirable.

Two sources:
- TRL's unpaired format `{"prompt", "completion", "label": bool}` (conversational too: `prompt`
  a list of role/content messages and `completion` the assistant's turn(s), rendered with the
  chat template as every other stage renders them);
- any preference file `tether rm` reads (pairs, hh-rlhf dialogues, K-wise rankings), read as
  unpaired: in each group the best-ranked responses are desirable and the worst-ranked ones
  undesirable; the ones ranked in between (K > 2) carry no such label and are left out.

Responses get the EOS appended, as SFT and DPO train it. Over-long examples lose the end of the
response and the start of the prompt (or are dropped, --over-length drop), as in the other
stages; malformed rows raise DataError naming the file and row.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tether.data.io import load_rows, require_columns, without_location
from tether.data.io import where as row_location
from tether.data.preference import (_turns, fit_to_length, is_messages, prompt_special_count,
                                    read_preference_rows, render_chat, tokenize_groups)
from tether.data.tokenize import encode_chat_or_prompt, encode_response
from tether.errors import DataError

log = logging.getLogger("tether")

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


@dataclass
class Example:
    prompt: str  # as the policy reads it (a rendered chat template when `chat`)
    chat: bool
    prompt_ids: list[int]
    completion_ids: list[int]  # response + EOS
    desirable: bool


def is_unpaired(ds: Any) -> bool:
    """TRL's unpaired format: a `completion` and a `label` column."""
    return {"completion", "label"} <= set(ds.column_names)


def load_unpaired(source: str, tokenizer: Any, max_length: int, over_length: str = "truncate") -> list[Example]:
    """Every labelled example of `source` (unpaired, or preference data read as unpaired)."""
    ds = load_rows(source)
    if not is_unpaired(ds):
        return _from_preferences(source, tokenizer, max_length, over_length)
    require_columns(ds, list(UNPAIRED_COLUMNS), source)
    eos, n_special = tokenizer.eos_token_id, prompt_special_count(tokenizer)
    examples, counts = [], Counter()
    for i, raw in enumerate(ds):
        where = row_location(source, raw, i)
        raw = without_location(raw)
        label = raw["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true (desirable) or false (undesirable); "
                            f"got {label!r}")
        prompt, completion, chat = _texts(raw, tokenizer, where)
        prompt_ids = encode_chat_or_prompt(tokenizer, prompt, chat)
        response = encode_response(tokenizer, completion)
        if not response:
            counts["empty completion"] += 1
            continue
        if len(prompt_ids) + len(response) + 1 > max_length:
            fitted = fit_to_length(prompt_ids, [response], max_length - 1, n_special) \
                if over_length == "truncate" else None
            if fitted is None:
                counts["dropped over --max-length"] += 1
                continue
            prompt_ids, (response,) = fitted
            counts["truncated to --max-length"] += 1
        examples.append(Example(prompt, chat, prompt_ids, response + [eos], label))
    if counts:
        log.warning("%s: %s", source, ", ".join(f"{n} {reason}" for reason, n in counts.items()))
    if not examples:
        raise DataError(f"{source}: no usable examples ({dict(counts) or 'no rows'})")
    return examples


def _texts(raw: dict, tokenizer: Any, where: str) -> tuple[str, str, bool]:
    """(prompt, completion, whether the prompt is a rendered chat template) of one row."""
    prompt, completion = raw["prompt"], raw["completion"]
    if is_messages(prompt) or is_messages(completion):
        if not is_messages(prompt):
            raise DataError(f"{where}: a conversational 'completion' needs 'prompt' as a list of "
                            "role/content messages")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: conversational rows need a tokenizer with a chat template; "
                            "this one has none. Give prompt and completion as plain strings.")
        try:
            prompt_text, (text,) = render_chat(tokenizer, list(prompt), [_turns(completion, "completion", where)])
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        return prompt_text, text, True
    for column, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise DataError(f"{where}: {column!r} must be a string or a list of role/content messages")
    return prompt, completion, False


def _from_preferences(source: str, tokenizer: Any, max_length: int, over_length: str) -> list[Example]:
    eos = tokenizer.eos_token_id
    rows = read_preference_rows(load_rows(source), source, tokenizer=tokenizer)
    groups = tokenize_groups(rows, tokenizer, max_length - 1, over_length, source)
    by_row = {row["row"]: row for row in rows}
    examples = []
    for group in groups:
        row = by_row[group.row]
        best, worst = min(group.ranks), max(group.ranks)
        for response, rank in zip(group.response_ids, group.ranks):
            if rank in (best, worst) and response:
                examples.append(Example(row["prompt"], row.get("chat", False), group.prompt_ids,
                                        response + [eos], rank == best))
    return examples
