"""SFT examples: tokenisation with response-only labels, length handling, collation, packing.

Accepted rows:
- `{"prompt": str, "completion": str}`: the completion and one EOS are scored;
- `{"messages": [{"role", "content"}, ...]}`: rendered by the tokenizer's chat template; only the
  assistant turns (including the template's end-of-turn tokens) are scored.
Prompt tokens get label -100 (HF's ignore index), so they contribute no loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tether.data.io import require_columns, visible_columns, where
from tether.data.tokenize import encode_prompt, encode_response
from tether.errors import DataError

log = logging.getLogger("tether")
IGNORE = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not scored


def detect_format(ds: Any, source: str) -> str:
    cols = set(ds.column_names)
    if "messages" in cols:
        require_columns(ds, ["messages"], source)
        return "messages"
    if "prompt" in cols or "completion" in cols:
        # an empty prompt is allowed: the whole completion is then learned (pretraining-style)
        require_columns(ds, ["prompt", "completion"], source, may_be_empty=["prompt"],
                        text=["prompt", "completion"])
        return "prompt_completion"
    raise DataError(f"{source} is missing column(s) 'prompt', 'completion' (or 'messages' for chat "
                    f"data); found columns: {', '.join(visible_columns(ds)) or '(none)'}")


def tokenize_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> TokenizedExample:
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = encode_response(tokenizer, completion) + [tokenizer.eos_token_id]
    return TokenizedExample(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)


def tokenize_messages(tokenizer: Any, messages: Sequence[dict], where: str) -> TokenizedExample:
    """Score exactly the tokens each assistant turn adds to the rendered conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' rows need a tokenizer with a chat template; this one "
                        "has none. Set tokenizer.chat_template or use prompt/completion rows.")
    render = lambda msgs, gen: encode_response(  # noqa: E731
        tokenizer, tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen))
    full = render(messages, False)
    labels = [IGNORE] * len(full)
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[:i + 1], False))
        if full[:end] != render(messages[:i + 1], False):
            raise DataError(f"{where}: the chat template renders turns inconsistently, so assistant "
                            "tokens cannot be located; use prompt/completion rows instead")
        labels[start:end] = full[start:end]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return TokenizedExample(full, labels)


def tokenize_sft(ds: Any, tokenizer: Any, source: str, max_length: int, over_length: str,
                 held_out: bool = False) -> list[TokenizedExample]:
    """Tokenise every row; truncate or drop over-long ones and log how many. A held-out set
    that loses every row that way is returned empty, with a warning (training goes on without
    held-out loss); a training set that does is an error."""
    fmt = detect_format(ds, source)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(ds):
        at = where(source, row, i)
        if fmt == "messages":
            ex = tokenize_messages(tokenizer, row["messages"], at)
        else:
            ex = tokenize_prompt_completion(tokenizer, str(row["prompt"]), str(row["completion"]))
        if len(ex.input_ids) > max_length:
            cut = TokenizedExample(ex.input_ids[:max_length], ex.labels[:max_length])
            if over_length == "drop" or all(label == IGNORE for label in cut.labels[1:]):
                dropped += 1  # nothing of the response would survive truncation
                continue
            ex, truncated = cut, truncated + 1
        examples.append(ex)
    if truncated or dropped:
        log.warning("%s: %d example(s) longer than --max-length %d were truncated and %d dropped",
                    source, truncated, max_length, dropped)
    if not examples and held_out:
        log.warning("%s: every held-out example is longer than --max-length %d; training goes on "
                    "without a held-out loss (raise --max-length to keep them)", source, max_length)
    elif not examples:
        raise DataError(f"{source}: every example is longer than --max-length {max_length} "
                        "(or has no response tokens left); raise --max-length")
    return examples


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into input_ids / attention_mask / labels, all shape (B, L)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: Sequence[TokenizedExample], max_length: int) -> list[list[TokenizedExample]]:
    """Greedy first-fit packing of examples into bins of at most `max_length` tokens."""
    bins: list[list[TokenizedExample]] = []
    sizes: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        for b, size in enumerate(sizes):
            if size + n <= max_length:
                bins[b].append(ex)
                sizes[b] += n
                break
        else:
            bins.append([ex])
            sizes.append(n)
    return bins


def collate_packed(rows: Sequence[Sequence[TokenizedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each bin into one row with a block-diagonal causal mask.

    Returns input_ids/labels/position_ids shape (B, L), attention_mask shape (B, 1, L, L)
    (bool, True = may attend) and token_count (0-dim, real tokens). Positions restart at 0 for every example, and no token can see a
    token of another example, so the loss equals that of the unpacked batch.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[r, at:at + n] = torch.tensor(ex.input_ids)
            labels[r, at:at + n] = torch.tensor(ex.labels)
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = s
            at += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segment[:, :, None] == segment[:, None, :]
    # padding rows attend to themselves only, so softmax never sees an all-masked row
    eye = torch.eye(width, dtype=torch.bool)
    mask = (causal & same & (segment[:, :, None] >= 0)) | eye
    return {"input_ids": ids, "attention_mask": mask[:, None], "labels": labels,
            "position_ids": positions, "token_count": (segment >= 0).sum()}
