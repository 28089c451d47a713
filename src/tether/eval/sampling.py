"""Sample responses from a causal LM for evaluation, best-of-N and preference-pair making.

Built on the rollout engine (`tether.rollout.generate`), so evaluation samples exactly the way
PPO does: left-padded prompts, a KV cache, responses cut at the first EOS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from tether.data.tokenize import encode_chat_or_prompt
from tether.models.load import pad_id
from tether.training.progress import Progress

log = logging.getLogger("tether")


@dataclass
class Samples:
    prompts: list[str]  # one per sample (a prompt repeats n times in a row)
    responses: list[str]  # decoded, without the EOS
    response_ids: list[list[int]]  # token ids, including the EOS when the response ended
    ended: list[bool]  # the response contains an EOS
    # the prompts are rendered chat templates (no special tokens added): all of them, or per sample
    chat: bool | list[bool] = False
    temperature: float = 1.0  # the samples were drawn from softmax(logits / temperature)
    top_k: int = 0  # ... truncated to the top_k most likely tokens (0 = not truncated)
    top_p: float = 1.0  # ... and to the top_p nucleus (1.0 = not truncated)
    # Spread over processes (`part`): which row of the whole list each sample is, and whether it
    # is this process's own (the others repeat a neighbour's, see `Spread`). Without a part,
    # every row in order, all owned.
    index: list[int] = field(default_factory=list)
    owned: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class Spread:
    """The rows one process of a launch computes when `total` rows are processed in batches of
    `batch_size` spread over `count` processes (part = (index, count)).

    Each batch of b rows is cut into `count` windows of ceil(b / count) rows; process p owns
    window p. Every process runs a window of the same size, because the forwards of a sharded
    model (--fsdp) are collectives: a window that would run past the batch's end is moved back
    to end there, and its rows before the process's own repeat a neighbour's. Such a repeat has
    the same prompt and, through `noise_rows`, the same sampling noise as the row it copies, so
    it ends when that row ends and no process decodes longer than one process alone would.
    With that noise each row is sampled as one process sampling the whole batch samples it."""

    rows: tuple[int, ...]  # the rows this process computes, batch after batch
    owned: tuple[bool, ...]  # which of them are its own
    batches: tuple[tuple[int, int, int, int], ...]  # (first local row, rows, noise offset, batch rows)

    @classmethod
    def of(cls, total: int, batch_size: int, part: tuple[int, int] = (0, 1)) -> "Spread":
        index, count = part
        rows: list[int] = []
        owned: list[bool] = []
        batches = []
        for at in range(0, total, batch_size):
            b = min(batch_size, total - at)
            size = -(-b // count)
            own = index * size
            offset = min(own, b - size)
            batches.append((len(rows), size, offset, b))
            rows.extend(at + offset + i for i in range(size))
            owned.extend(offset + i >= own for i in range(size))
        return cls(tuple(rows), tuple(owned), tuple(batches))


def gather_owned(accelerator: Any, index: Sequence[int], owned: Sequence[bool],
                 **columns: Sequence[Any]) -> dict[str, list]:
    """Every process's own rows of each column, put back in row order, on every process (a
    collective when there are several; the objects travel between this launch's processes)."""
    mine = [(i, *values) for i, keep, *values in zip(index, owned, *columns.values()) if keep]
    if accelerator is not None and accelerator.num_processes > 1:
        import torch.distributed as dist

        parts: list[Optional[list]] = [None] * accelerator.num_processes
        dist.all_gather_object(parts, mine)
        mine = [row for part in parts for row in (part or [])]
    mine.sort(key=lambda row: row[0])
    return {name: [row[k + 1] for row in mine] for k, name in enumerate(columns)}


def per_row(chat: bool | Sequence[bool], n: int) -> list[bool]:
    """One chat flag per row, from one for all rows or one per row."""
    if isinstance(chat, bool):
        return [chat] * n
    if len(chat) != n:
        raise ValueError(f"{len(chat)} chat flags for {n} prompts")
    return list(chat)


def _fit_to_positions(model: Any, max_new_tokens: int, max_prompt_length: int | None,
                      encoded: Sequence[Sequence[int]]) -> int | None:
    """The prompt length to cut to, so that a prompt and its response fit the model's learned
    position table (GPT-2, OPT, ...), with a warning when prompts lose their beginnings for it.
    A response that alone does not fit is an error."""
    from tether.errors import ConfigError
    from tether.models.load import position_limit

    found = position_limit(model)
    if found is None:
        return max_prompt_length
    limit, key = found
    if max_new_tokens >= limit:
        raise ConfigError(f"responses of {max_new_tokens} tokens do not fit the model's learned position "
                          f"table ({limit} positions, {key} in its config) after even one prompt token: "
                          "lower the response length")
    room = limit - max_new_tokens
    cut = sum(len(e) > room for e in encoded) if not max_prompt_length or max_prompt_length > room else 0
    if cut:
        log.warning("%d prompt(s) lose their beginnings: the model's learned position table holds %d "
                    "positions (%s), and each response takes %d", cut, limit, key, max_new_tokens)
    return min(max_prompt_length or room, room)


@torch.no_grad()
def sample_responses(model: Any, tokenizer: Any, prompts: Sequence[str], n: int = 1,
                     max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
                     max_prompt_length: int | None = None, progress: str = "",
                     chat: bool | Sequence[bool] = False, part: tuple[int, int] = (0, 1),
                     backend: str = "torch", source: str = "",
                     trust_remote_code: bool = False) -> Samples:
    """`n` samples for every prompt, in prompt order. Deterministic for a given seed.
    progress: a label for a progress bar over the samples (none when empty). chat: the prompts
    are rendered chat templates, encoded without added special tokens (a bool for all of them,
    or one per prompt; `Samples.chat` is then one per sample). part: (this process,
    number of processes) to sample this process's rows only, as `Spread` lays them out (the
    same samples as one process draws); `gather_owned` puts the rows of all back together.
    backend: "torch" (tether's sampler) or "vllm", an engine started from `source` (the
    directory `model` was loaded from) for this call and shut down after it."""
    from tether.models.load import eos_token_ids
    from tether.rollout.generate import KVCacheSampler, SamplingParams, left_pad

    eos = eos_token_ids(tokenizer, model)
    pad = pad_id(tokenizer, eos[0])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_token_ids=tuple(eos), pad_token_id=pad)
    device = next(model.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    flat_chat = [c for c in per_row(chat, len(prompts)) for _ in range(n)]
    spread = Spread.of(len(flat), batch_size, part)
    mine = [flat[i] for i in spread.rows]
    mine_chat = [flat_chat[i] for i in spread.rows]
    encoded = [encode_chat_or_prompt(tokenizer, p, c) for p, c in zip(mine, mine_chat)]
    max_prompt_length = _fit_to_positions(model, max_new_tokens, max_prompt_length, encoded)
    if max_prompt_length:
        encoded = [e[-max_prompt_length:] for e in encoded]
    out = Samples([], [], [], [], chat if isinstance(chat, bool) else mine_chat, temperature, top_k,
                  top_p, list(spread.rows), list(spread.owned))
    if backend == "vllm":
        from tether.rollout.vllm_engine import VLLMGenerator

        longest = max((len(e) for e in encoded), default=1)
        sampler: Any = VLLMGenerator(model, params, source=source, dtype=next(model.parameters()).dtype,
                                     max_model_len=longest + max_new_tokens, seed=seed,
                                     trust_remote_code=trust_remote_code, max_rows=batch_size)
    else:
        sampler = KVCacheSampler(model, params, gather=True)  # gather: a sharded model's weights
    bar = Progress(len(flat), desc=progress, enabled=bool(progress) and len(flat) > batch_size)
    try:
        for first, size, offset, rows in spread.batches:
            ids, mask = left_pad(encoded[first:first + size], pad, device)
            rollout = sampler.generate(ids, mask, rng, noise_rows=(offset, rows))
            for row in range(ids.shape[0]):
                keep = rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()
                text_ids = [t for t in keep if t not in eos]
                out.prompts.append(mine[first + row])
                out.responses.append(tokenizer.decode(text_ids, skip_special_tokens=True))
                out.response_ids.append(keep)
                out.ended.append(bool(rollout.ended[row]))
            bar.update(rows)
    finally:
        bar.close()
        sampler.close()
    return out


@torch.no_grad()
def response_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str],
                      response_ids: Sequence[Sequence[int]], batch_size: int = 64,
                      chat: bool | Sequence[bool] = False, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> list[float]:
    """Summed log-probability of each response (token ids) given its prompt, under
    softmax(logits / temperature), truncated as a top-k / top-p sampler truncates it when those
    are set. chat: the prompts are rendered chat templates (see `sample_responses`; a bool, or
    one per prompt)."""
    from tether.ops.logprobs import sequence_logprobs
    from tether.rollout.generate import truncate_scores

    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    truncated = top_k > 0 or top_p < 1.0
    chats = per_row(chat, len(prompts))
    out: list[float] = []
    for at in range(0, len(prompts), batch_size):
        rows, labels = [], []
        for prompt, resp, is_chat in zip(prompts[at:at + batch_size], response_ids[at:at + batch_size],
                                         chats[at:at + batch_size]):
            p = encode_chat_or_prompt(tokenizer, prompt, is_chat)
            rows.append(p + list(resp))
            labels.append([-100] * len(p) + list(resp))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, l) in enumerate(zip(rows, labels)):
            ids[i, :len(r)], lab[i, :len(l)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(l), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        if truncated:  # the tempered, truncated scores: read below at temperature 1
            logits = truncate_scores(logits.float() / temperature, top_k, top_p)
        sums, _ = sequence_logprobs(logits, lab.to(device), temperature=1.0 if truncated else temperature)
        out.extend(sums.tolist())
    return out


def kl_to_reference(policy: Any, reference: Any, tokenizer: Any, samples: Samples,
                    batch_size: int = 64) -> float:
    """The mean of `kl_terms` (see there)."""
    terms = kl_terms(policy, reference, tokenizer, samples, batch_size)
    return sum(terms) / max(len(terms), 1)


def kl_terms(policy: Any, reference: Any, tokenizer: Any, samples: Samples,
             batch_size: int = 64) -> list[float]:
    """Monte-Carlo KL(policy || reference) per sequence: log pi(y) - log ref(y) of each sample
    y ~ pi, whose mean estimates the KL.

    pi is what the samples were drawn from: the policy at the samples' temperature, truncated by
    their top-k / top-p when set. The reference is read at the same temperature and never
    truncated, so the estimate says how far the samples' distribution is from the reference
    model itself (PPO's KL penalty uses the same tempered reference)."""
    args = (samples.prompts, samples.response_ids, batch_size, samples.chat, samples.temperature)
    lp = response_logprobs(policy, tokenizer, *args, top_k=samples.top_k, top_p=samples.top_p)
    lr = response_logprobs(reference, tokenizer, *args)
    return [a - b for a, b in zip(lp, lr)]
