"""Scoring a batch of rollouts: reference logprobs and reward-model scores, each in one batched
no-grad forward (chunked only when a batch would not fit).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from tether.data.preference import encode_for_scoring, render_for_scoring
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

    def read_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters its forward reads: with adapters off, not the adapters'."""
        named = list(self.model.named_parameters())
        if self.adapters_off:
            named = [(n, p) for n, p in named if "lora_" not in n and "modules_to_save" not in n]
        return named

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
    response_part = seqs.attention_mask[:, P:].bool()  # a whole episode, its observations too
    if eos_token_ids:  # the EOS that ends the response (or the episode's last turn)
        eos = torch.tensor(list(eos_token_ids), device=seqs.response_ids.device)
        last = response_part & (response_part.long().cumsum(-1) == response_part.sum(-1, keepdim=True))
        response_part &= ~(last & torch.isin(seqs.response_ids, eos))
    mask = torch.cat([seqs.attention_mask[:, :P].bool(), response_part], dim=1)
    L = mask.shape[1]
    # Rotate each row left by its count of leading pads: a gather, no per-row Python.
    lead = (mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)
    index = (torch.arange(L, device=mask.device) + lead) % L
    mask = mask.gather(1, index)
    ids = torch.where(mask, seqs.input_ids.gather(1, index), torch.full_like(seqs.input_ids, pad_token_id))
    width = max(int(mask.sum(-1).max()), 1)
    return ids[:, :width], mask[:, :width].long()


class RewardScores(NamedTuple):
    scores: Tensor  # (B,) float32, calibrated
    noncanonical: Tensor  # (B,) bool: the response's ids are not what its text encodes to
    metrics: dict = {}  # per reward function: reward_fn/<name>/mean, /std, /applied
    texts: list = []  # the responses' texts (EOS left out), as a user sees them


class RewardScorer:
    """Calibrated RM scores of rollouts, always of the text a user would see.

    When the RM has its own tokenizer (a hub RM of another family), every text is decoded and
    re-encoded with it. Otherwise the policy's tokens are scored directly, but only where they are
    what their own text encodes to. A response can decode to a text that encodes back to other
    ids: a byte-level BPE token that is half of a UTF-8 character decodes to U+FFFD, and a
    policy can learn token sequences that no text would ever give (reward hacking through ids
    the RM never saw in training). Such a response is flagged as non-canonical and scored on
    its re-encoded text, as `tether score` would score the saved sample.
    """

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
              prompt_chats: Optional[Sequence[Optional[list[dict]]]] = None,
              transcripts: Optional[Sequence[str]] = None) -> RewardScores:
        """One calibrated score per rollout, and which rollouts were non-canonical.
        prompt_chats: each prompt's messages (None for a plain prompt), so that an RM with its
        own chat template reads them in it. transcripts: multi-turn episodes (--env) as text;
        the RM then reads each whole episode as sampled, observations included (or its text,
        re-tokenised, for an RM with its own tokenizer)."""
        if transcripts is not None:  # the episodes as sampled (or their text, for another tokenizer)
            texts = list(transcripts)
            noncanonical = torch.zeros(len(texts), dtype=torch.bool)
            if self.rm_tokenizer is not None:
                rm_ids, mask = self._retokenized(texts, prompt_texts, None, seqs.input_ids.device)
            else:
                rm_ids, mask = reward_model_inputs(seqs, self.eos_token_ids, self.pad_token_id)
        else:
            ids = response_ids(seqs, self.eos_token_ids)
            texts = self._decode(ids)
            if self.policy_tokenizer is not None:  # encoded as a response is (`encode_response`)
                again = [list(a) for a in self.policy_tokenizer(texts, add_special_tokens=False)["input_ids"]]
                noncanonical = torch.tensor([a != b for a, b in zip(again, ids)], dtype=torch.bool)
            else:  # no tokenizer to check against: scored as sampled
                noncanonical, again = torch.zeros(len(ids), dtype=torch.bool), ids
            if self.rm_tokenizer is not None:
                rm_ids, mask = self._retokenized(texts, prompt_texts, prompt_chats, seqs.input_ids.device)
            elif bool(noncanonical.any()):
                rm_ids, mask = self._reencoded(seqs, again)
            else:
                rm_ids, mask = reward_model_inputs(seqs, self.eos_token_ids, self.pad_token_id)
        self.model.eval()
        scores = torch.cat([calibrated_scores(self.model, rm_ids[rows], mask[rows])
                            for rows in row_chunks(rm_ids.shape[0], self.chunk)])
        return RewardScores(scores, noncanonical.to(scores.device), {}, texts)

    def _decode(self, ids: list[list[int]]) -> list[str]:
        if self.policy_tokenizer is None:
            return [""] * len(ids)
        return self.policy_tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _reencoded(self, seqs: Sequences, responses: list[list[int]]) -> tuple[Tensor, Tensor]:
        """The RM's inputs with each response replaced by the ids its text encodes to (the
        prompt ids as sampled), right-padded; an over-long row keeps its last max_length ids."""
        P = seqs.n_prompt
        rows = []
        for prompt, mask, response in zip(seqs.input_ids[:, :P], seqs.attention_mask[:, :P], responses):
            row = prompt[mask.bool()].tolist() + response
            rows.append(row[-self.max_length:])
        ids, mask = right_pad(rows, self.pad_token_id)
        return ids.to(seqs.input_ids.device), mask.to(seqs.input_ids.device)

    def _retokenized(self, responses: list[str], prompt_texts: Optional[Sequence[str]],
                     prompt_chats: Optional[Sequence[Optional[list[dict]]]],
                     device: torch.device) -> tuple[Tensor, Tensor]:
        if prompt_texts is None:
            raise ValueError("an RM with its own tokenizer needs the prompt texts")
        # A chat prompt is rendered in the RM's own chat template, when it has one, as
        # `tether rm` renders conversational data. Then both are encoded as the RM was trained
        # and as `tether score` reads text: prompt and response apart, no EOS, an over-long
        # sequence losing the start of its prompt.
        chats = prompt_chats if prompt_chats is not None else [None] * len(responses)
        rows = []
        for text, chat, response in zip(prompt_texts, chats, responses):
            text, (response,), rendered = render_for_scoring(
                self.rm_tokenizer, chat if chat is not None else text, [response], fallback=text)
            rows.append(encode_for_scoring(self.rm_tokenizer, text, [response], self.max_length,
                                           chat=rendered)[0])
        pad = pad_id(self.rm_tokenizer)
        ids, mask = right_pad(rows, pad)
        return ids.to(device), mask.to(device)


def response_ids(seqs: Sequences, eos_token_ids: Sequence[int]) -> list[list[int]]:
    """Each response's ids without its EOS and padding."""
    keep = seqs.response_mask.bool()
    if eos_token_ids:
        eos = torch.tensor(list(eos_token_ids), device=keep.device)
        keep &= ~torch.isin(seqs.response_ids, eos)
    return [row[m].tolist() for row, m in zip(seqs.response_ids, keep)]


class RewardSources:
    """Every reward of a run: a learned reward model (`RewardScorer`), Python reward functions
    (`rollout.reward_fns.RewardFunctions`), or both, added. `model` is the RM (None without)."""

    def __init__(self, scorer: Optional[RewardScorer], functions: Any, tokenizer: Any,
                 eos_token_ids: Sequence[int]):
        self.scorer = scorer
        self.functions = functions
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)

    @property
    def model(self) -> Any:
        return self.scorer.model if self.scorer is not None else None

    @torch.no_grad()
    def score(self, seqs: Sequences, prompt_texts: Sequence[str],
              prompt_chats: Optional[Sequence[Optional[list[dict]]]] = None,
              columns: Optional[dict[str, list]] = None,
              rows: Optional[Sequence[str]] = None, state: Any = None,
              transcripts: Optional[Sequence[str]] = None) -> RewardScores:
        """The score of each rollout: the RM's calibrated score plus the weighted function
        rewards. columns: the prompts' other data columns, aligned with the rows; rows: where
        each prompt came from (for error messages); state: what the functions that take it get
        as `trainer_state` (`reward_fns.trl_trainer_state`); transcripts: multi-turn episodes as
        text (--env), which the RM and the functions then score as the completions."""
        if self.scorer is not None:
            out = self.scorer.score(seqs, prompt_texts, prompt_chats, transcripts)
        else:
            texts = list(transcripts) if transcripts is not None else self.tokenizer.batch_decode(
                response_ids(seqs, self.eos_token_ids), skip_special_tokens=True)
            zeros = torch.zeros(len(texts), device=seqs.input_ids.device)
            out = RewardScores(zeros, zeros.bool(), {}, texts)
        if self.functions is None:
            return out
        rows = list(rows) if rows is not None else [f"row {i + 1}" for i in range(len(out.texts))]
        # TRL's completion_ids: each response's ids up to and including its EOS
        ids = [row[m.bool()].tolist() for row, m in zip(seqs.response_ids, seqs.response_mask)]
        extras = {"completion_ids": ids, **({"trainer_state": state} if state is not None else {})}
        total, per_fn = self.functions(prompt_texts, out.texts, columns or {}, rows,
                                       scored_elsewhere=self.scorer is not None, chats=prompt_chats,
                                       extras=extras)
        from tether.rollout.reward_fns import function_metrics

        scores = out.scores + torch.tensor(total, dtype=out.scores.dtype, device=out.scores.device)
        return RewardScores(scores, out.noncanonical, function_metrics(per_fn), out.texts)


def same_vocabulary(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab()
