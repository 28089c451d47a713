"""PPO's data: prompts (tokenised once, over-long ones truncated or dropped; plain or
conversational, `data.prompts`) and PPO-ptx text.

The order of prompts is decided by `GlobalBatches` from the seed alone: iteration i always uses
the same prompts, which is what makes resume exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from tether.data.io import load_rows, require_columns, visible_columns, where
from tether.data.prompts import prompt_column, prompt_text
from tether.data.tokenize import encode_chat_or_prompt, encode_prompt
from tether.errors import DataError
from tether.rollout.generate import left_pad
from tether.training.batches import GlobalBatches

log = logging.getLogger("tether")


@dataclass
class PromptSet:
    ids: list[list[int]]  # one token list per prompt
    texts: list[str]  # the prompt as the policy reads it (chat template applied)
    truncated: int = 0
    dropped: int = 0
    chats: list[Optional[list[dict]]] = field(default_factory=list)  # messages, None if plain
    columns: dict[str, list] = field(default_factory=dict)  # the file's other columns, per prompt
    rows: list[str] = field(default_factory=list)  # where each prompt came from (file:line)
    raw: list[dict] = field(default_factory=list)  # each prompt's row as read (environments' reset)

    def batch(self, indices: Sequence[int], pad_token_id: int,
              device: Any) -> tuple[Tensor, Tensor, list[str]]:
        """(ids (B, P), mask (B, P), texts): the prompts at `indices`, left-padded."""
        ids, mask = left_pad([self.ids[i] for i in indices], pad_token_id, device)
        return ids, mask, [self.texts[i] for i in indices]

    def chats_at(self, indices: Sequence[int]) -> list[Optional[list[dict]]]:
        """The prompts' messages (None for plain prompts), for an RM with its own chat template."""
        return [self.chats[i] if self.chats else None for i in indices]

    def columns_at(self, indices: Sequence[int]) -> dict[str, list]:
        """The other data columns of the prompts at `indices` (for reward functions)."""
        return {name: [values[i] for i in indices] for name, values in self.columns.items()}

    def records_at(self, indices: Sequence[int]) -> list[dict]:
        """The prompts' rows as read, every column (what an environment's reset gets)."""
        return [dict(self.raw[i]) for i in indices] if self.raw else [{} for _ in indices]

    def rows_at(self, indices: Sequence[int]) -> list[str]:
        return [self.rows[i] for i in indices] if self.rows else [f"prompt {i + 1}" for i in indices]


def load_prompts(source: str, tokenizer: Any, max_length: int, truncation: str,
                 tools_for: Optional[Any] = None) -> PromptSet:
    """Tokenise every prompt; truncate from the left (keeping a leading BOS) or drop over-long
    ones, and log how many. tools_for(row, where): the JSON schemas of the tools the row's
    environment offers (--env), which a chat template with a tools section lists in the prompt."""
    ds = load_rows(source)
    prompt_column(ds, source)
    out = PromptSet([], [])
    extra = [c for c in visible_columns(ds) if c not in ("prompt", "messages")]
    bos = tokenizer.bos_token_id
    for i, row in enumerate(ds):
        tools = tools_for(row, where(source, row, i)) if tools_for is not None else None
        text, messages = prompt_text(tokenizer, row, where(source, row, i), tools)
        ids = encode_chat_or_prompt(tokenizer, text, chat=messages is not None)
        if len(ids) > max_length:
            if truncation == "drop":
                out.dropped += 1
                continue
            keep_bos = bos is not None and ids[0] == bos and max_length > 1
            ids = ([bos] + ids[-(max_length - 1):]) if keep_bos else ids[-max_length:]
            out.truncated += 1
        out.ids.append(ids)
        out.texts.append(text)
        out.chats.append(messages)
        out.rows.append(where(source, row, i))
        if tools_for is not None:
            out.raw.append(dict(row))
        for name in extra:
            out.columns.setdefault(name, []).append(row[name])
    if out.truncated or out.dropped:
        log.warning("%s: %d prompt(s) longer than --max-prompt-length %d were %s", source,
                    out.truncated or out.dropped, max_length,
                    "truncated from the left" if out.truncated else "dropped")
    if not out.ids:
        raise DataError(f"{source}: no prompt fits --max-prompt-length {max_length}")
    return out


class PtxData:
    """PPO-ptx rows (InstructGPT): plain text kept under a language-modelling loss.

    Rows hold `text`, or `prompt` + `completion`. Batch k uses rows decided by the seed alone.
    With several processes, batch k is shared out as the prompts are: each process reads
    `rows_per_batch` rows of a global batch of `rows_per_batch x world_size`, the rows one
    process would read alone with that many per batch.
    """

    def __init__(self, source: str, tokenizer: Any, max_length: int, rows_per_batch: int, seed: int,
                 world_size: int = 1, rank: int = 0):
        ds = load_rows(source)
        if "text" in ds.column_names:
            require_columns(ds, ["text"], source)
            texts = [str(t) for t in ds["text"]]
        else:
            require_columns(ds, ["prompt", "completion"], source)
            texts = [str(p) + str(c) for p, c in zip(ds["prompt"], ds["completion"])]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.rows = [(encode_prompt(tokenizer, t) + eos)[:max_length] for t in texts]
        self.pad = tokenizer.pad_token_id
        self.order = GlobalBatches(len(self.rows), rows_per_batch, 1, world_size, seed + 1)
        self.rank = rank

    def batch(self, k: int, device: Any) -> dict[str, Tensor]:
        """This process's right-padded input_ids, attention_mask and labels (-100 on padding)
        of batch k."""
        rows = [self.rows[i] for i in self.order.step_indices(k, self.rank)[0]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
