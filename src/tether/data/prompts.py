"""Prompts of the stages that sample from a policy: PPO, GRPO, RLOO, online DPO, best-of-N, eval
and iterate.

A row gives its prompt as `prompt` (a string), as `messages`, or as a `prompt` that holds
messages (TRL's conversational form): a list of {"role", "content"} dicts. A conversation is
rendered with the policy's chat template and its generation prompt, so that the policy answers
as the assistant; a final assistant turn (an SFT row) is left out, since it is the answer. The
files a stage writes keep the messages, never the rendering: the rendering belongs to whichever
model reads them next (a reward model or judge renders them in its own template,
`data.preference.render_for_scoring`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tether.data.io import load_rows, require_columns
from tether.data.io import where as row_location
from tether.data.preference import is_messages
from tether.errors import DataError

Prompt = str | list[dict]  # a plain prompt, or a conversation's messages


def prompt_column(ds: Any, source: str) -> str:
    """The column that holds the prompts ("messages" when there is one, else "prompt"), checked
    to be there and non-empty on every row; a `prompt` column of strings must hold strings only
    (one of messages is checked row by row, by `row_prompt`)."""
    column = "messages" if "messages" in ds.column_names else "prompt"
    chats = column == "prompt" and column in ds.column_names and any(map(is_messages, ds[column]))
    require_columns(ds, [column], source, text=["prompt"] if column == "prompt" and not chats else [])
    return column


def row_prompt(row: dict, where: str) -> Prompt:
    """A row's prompt: its `prompt` string, or the messages of `messages` (or of a `prompt` that
    holds them), less a final assistant turn."""
    chat = row.get("messages") or (row["prompt"] if is_messages(row.get("prompt")) else None)
    if chat:
        if not is_messages(chat):
            raise DataError(f"{where}: column 'messages' holds {chat!r}: give a list of {{role, "
                            "content}} messages")
        messages = list(chat)
        return messages[:-1] if messages[-1].get("role") == "assistant" and len(messages) > 1 else messages
    if not isinstance(row.get("prompt"), str):
        raise DataError(f"{where}: column 'prompt' holds {row.get('prompt')!r}: give a string, or a "
                        "list of {role, content} messages")
    return row["prompt"]


def render_prompt(tokenizer: Any, prompt: Prompt, where: str, tools: list[dict] | None = None) -> str:
    """The prompt as the policy reads it: a string as it is, messages in its chat template with
    the generation prompt. tools: JSON schemas of the tools the row's environment offers
    (--env), given to a chat template with a tools section (`with_tools` otherwise)."""
    if isinstance(prompt, str):
        return with_tools(tokenizer, prompt, tools) if tools else prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversational prompts (role/content messages) need a "
                        "tokenizer with a chat template")
    extra = {"tools": tools} if tools and template_takes_tools(tokenizer) else {}
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **extra)


def template_takes_tools(tokenizer: Any) -> bool:
    """The chat template has a tools section (it reads the `tools` variable)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def with_tools(tokenizer: Any, prompt: Prompt, tools: list[dict]) -> Prompt:
    """A prompt whose template cannot list tools, with them described in tether's plain format
    (`envs.tools.describe_tools`): before a plain prompt, or as (the start of) the system message."""
    from tether.envs.tools import describe_tools

    text = describe_tools(tools)
    if isinstance(prompt, str):
        return text + prompt
    if template_takes_tools(tokenizer):
        return prompt
    if prompt and prompt[0].get("role") == "system":
        return [{**prompt[0], "content": text + "\n" + prompt[0]["content"]}] + prompt[1:]
    return [{"role": "system", "content": text.rstrip("\n")}] + prompt


def prompt_text(tokenizer: Any, row: dict, where: str,
                tools: list[dict] | None = None) -> tuple[str, list[dict] | None]:
    """(text the policy reads, messages or None) of one row (`row_prompt`, `render_prompt`);
    with `tools` (--env), the messages as rendered, the tools' description included."""
    prompt = row_prompt(row, where)
    if tools and isinstance(prompt, list):
        prompt = with_tools(tokenizer, prompt, tools)
    return render_prompt(tokenizer, prompt, where, tools), (prompt if isinstance(prompt, list) else None)


def read_prompts(source: str, limit: int = 0) -> list[Prompt]:
    """Every row's prompt (a string or messages, `row_prompt`), the first `limit` when > 0."""
    ds = load_rows(source)
    prompt_column(ds, source)
    rows = ds.select(range(min(limit, len(ds)))) if limit > 0 else ds
    return [row_prompt(row, row_location(source, row, i)) for i, row in enumerate(rows)]


def render_prompts(tokenizer: Any, prompts: Sequence[Prompt], source: str) -> tuple[list[str], list[bool]]:
    """(texts, chat): each prompt as the policy reads it, and whether it is a rendered chat
    template (encoded without added special tokens, `data.tokenize.encode_chat_or_prompt`)."""
    texts = [render_prompt(tokenizer, p, f"{source} prompt {i + 1}") for i, p in enumerate(prompts)]
    return texts, [is_messages(p) for p in prompts]


def prompt_key(prompt: Prompt) -> str:
    """A string that is the same for the same prompt in any file: a string prompt itself, a
    conversation as canonical JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def shown_text(prompt: Prompt) -> str:
    """A prompt as a person reads it in a table: a conversation as "role: content" turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def has_chats(prompts: Sequence[Prompt]) -> bool:
    return any(is_messages(p) for p in prompts)
