"""Scoring a batch of rollouts: reference logprobs and reward-model scores, each in one batched
no-grad forward (chunked only when a batch would not fit).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from tether.data.preference import encode_for_scoring, render_chat
from tether.models.critic import response_logits
from tether.models.load import pad_id
from tether.models.reward import calibrated_scores, right_pad
from tether.ops.logprobs import token_logprobs
from tether.rollout.types import Sequences


def row_chunks(n: int, chunk: int) -> list[slice]:
    chunk = chunk if chunk > 0 else n
    return [slice(i, i + chunk) for i in range(0, n, chunk)]


class Reference:
    """The frozen SFT policy pi_ref: a separate frozen copy, or (with LoRA) the policy's own base
    model with its adapters disabled, so that no second copy is held in memory."""

    def __init__(self, model: Any, adapters_off: bool = False, chunk: int = 0):
        self.model = model
        self.adapters_off = adapters_off
        self.chunk = chunk

    def _context(self) -> Any:
        return self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()

    @torch.no_grad()
    def logprobs(self, seqs: Sequences, temperature: float) -> Tensor:
        """log pi_ref(y_t) of every response token, at the sampling temperature: (B, T) float32."""
        T = seqs.response_ids.shape[1]
        out = []
        was_training = self.model.training
        self.model.eval()
        with self._context():
            for rows in row_chunks(seqs.input_ids.shape[0], self.chunk):
                logits = response_logits(self.model, seqs.input_ids[rows], seqs.attention_mask[rows],
                                         seqs.position_ids[rows], T)
                out.append(token_logprobs(logits, seqs.response_ids[rows], temperature))
        self.model.train(was_training)
        return torch.cat(out)


def reward_model_inputs(seqs: Sequences, eos_token_ids: Sequence[int],
                        pad_token_id: int) -> tuple[Tensor, Tensor]:
    """What the RM reads: prompt + response up to but EXCLUDING the EOS (RMs are trained without
    it), moved to the left edge of each row (right padding), everything else the pad id.

    Right padding puts every row's first real token at position 0 whatever the model's position
    convention, and makes the last attended token the last non-pad one, as HF's
    SequenceClassification models read it. Returns (input_ids, attention_mask), both (B, W)
    long, W = the longest row.
    """
    P = seqs.n_prompt
    response_part = seqs.response_mask.bool()
    if eos_token_ids:
        eos = torch.tensor(list(eos_token_ids), device=seqs.response_ids.device)
        response_part &= ~torch.isin(seqs.response_ids, eos)
    mask = torch.cat([seqs.attention_mask[:, :P].bool(), response_part], dim=1)
    L = mask.shape[1]
    # Rotate each row left by its count of leading pads: a gather, no per-row Python.
    lead = (mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)
    index = (torch.arange(L, device=mask.device) + lead) % L
    mask = mask.gather(1, index)
    ids = torch.where(mask, seqs.input_ids.gather(1, index), torch.full_like(seqs.input_ids, pad_token_id))
    width = max(int(mask.sum(-1).max()), 1)
    return ids[:, :width], mask[:, :width].long()


class RewardScorer:
    """Calibrated RM scores of rollouts. When the RM has its own tokenizer (a hub RM of another
    family), the texts are decoded and re-encoded with it; otherwise the policy's tokens are
    scored directly."""

    def __init__(self, model: Any, eos_token_ids: Sequence[int], pad_token_id: int,
                 policy_tokenizer: Any = None, rm_tokenizer: Any = None, chunk: int = 0,
                 max_length: int = 4096):
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.policy_tokenizer = policy_tokenizer
        self.rm_tokenizer = rm_tokenizer  # None: same vocabulary as the policy
        self.chunk = chunk
        self.max_length = max_length

    @torch.no_grad()
    def score(self, seqs: Sequences, prompt_texts: Optional[Sequence[str]] = None,
              prompt_chats: Optional[Sequence[Optional[list[dict]]]] = None) -> Tensor:
        """One calibrated score per rollout: (B,) float32. prompt_chats: each prompt's messages
        (None for a plain prompt), so that an RM with its own chat template reads them in it."""
        if self.rm_tokenizer is not None:
            ids, mask = self._retokenized(seqs, prompt_texts, prompt_chats)
        else:
            ids, mask = reward_model_inputs(seqs, self.eos_token_ids, self.pad_token_id)
        self.model.eval()
        return torch.cat([calibrated_scores(self.model, ids[rows], mask[rows])
                          for rows in row_chunks(ids.shape[0], self.chunk)])

    def _retokenized(self, seqs: Sequences, prompt_texts: Optional[Sequence[str]],
                     prompt_chats: Optional[Sequence[Optional[list[dict]]]] = None) -> tuple[Tensor, Tensor]:
        if prompt_texts is None:
            raise ValueError("an RM with its own tokenizer needs the prompt texts")
        keep = seqs.response_mask.bool()
        if self.eos_token_ids:
            eos = torch.tensor(list(self.eos_token_ids), device=keep.device)
            keep &= ~torch.isin(seqs.response_ids, eos)
        responses = [self.policy_tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
                     for row, m in zip(seqs.response_ids, keep)]
        # A chat prompt is rendered in the RM's own chat template, when it has one, as
        # `tether rm` renders conversational data. Then both are encoded as the RM was trained
        # and as `tether score` reads text: prompt and response apart, no EOS, an over-long
        # sequence losing the start of its prompt.
        chats = prompt_chats if prompt_chats is not None else [None] * len(responses)
        own_template = bool(getattr(self.rm_tokenizer, "chat_template", None))
        rows = []
        for text, chat, response in zip(prompt_texts, chats, responses):
            rendered = chat is not None and own_template
            if rendered:
                text, (response,) = render_chat(self.rm_tokenizer, chat,
                                                [[{"role": "assistant", "content": response}]])
            rows.append(encode_for_scoring(self.rm_tokenizer, text, [response], self.max_length,
                                           chat=rendered)[0])
        pad = pad_id(self.rm_tokenizer)
        ids, mask = right_pad(rows, pad)
        device = seqs.input_ids.device
        return ids.to(device), mask.to(device)


def same_vocabulary(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab()
