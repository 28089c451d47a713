"""Token-level conventions shared by every stage.

A prompt is encoded with the tokenizer's own special-token convention (Llama adds BOS, GPT-2
adds nothing), a response is encoded without special tokens, and the two id lists are
concatenated. Encoding them separately keeps the prompt/response boundary exact, which is what
the loss masks and the rollout engine need.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids with the tokenizer's leading special tokens (BOS if it adds one), no EOS.
    A prompt whose text already opens with the BOS token (a rendered chat template) keeps one."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos] and tokenizer.bos_token and \
            text.startswith(tokenizer.bos_token):
        ids = ids[1:]
    while ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id and \
            _adds_eos(tokenizer):
        ids.pop()
    return ids


def encode_response(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat_or_prompt(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """A prompt's ids. A rendered chat template (`chat`) carries its own special tokens, so it
    is encoded without adding any, as SFT and PPO encode it; a plain prompt gets the
    tokenizer's own (`encode_prompt`)."""
    return encode_response(tokenizer, prompt) if chat else encode_prompt(tokenizer, prompt)


def _adds_eos(tokenizer: Any) -> bool:
    return _adds_eos_cached(id(tokenizer), tokenizer)


@lru_cache(maxsize=64)
def _adds_eos_cached(_key: int, tokenizer: Any) -> bool:
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
