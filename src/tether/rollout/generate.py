"""Response generation behind a small interface, so that the online loop does not know which
engine samples.

Two backends ship here, and vLLM (`rollout/vllm_engine.py`, imported only when chosen) is the
third:
- `KVCacheSampler` (default): a lean loop with a KV cache. One decode step per generated token
  and no other per-token Python work (no logits processors, no stopping-criteria objects, no
  per-step output bookkeeping); it stops as soon as every row has ended. For small models that
  overhead is most of HF generate's time. On CPU, for Llama, Mistral, Qwen2 and Qwen3, the step
  is the fused one of `tether.rollout.decode`; other models run their own forward with their own
  cache.
- `HFGenerator`: transformers' `generate()`, for models whose cache or forward the lean loop
  does not support.
Both return a `Rollout` whose responses are cut at their first EOS (any of the EOS ids).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import Tensor

from tether.models.prefix import cache_keyword, output_cache, shareable_groups
from tether.ops.masking import response_mask
from tether.rollout.decode import decoder_for
from tether.rollout.types import Rollout, position_ids_from_mask


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int  # T: the response length limit
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    eos_token_ids: tuple[int, ...] = ()  # empty = never stop early (benchmarks)
    pad_token_id: int = 0
    # (this process, number of processes): each step draws the noise of every process's rows
    # and keeps its own, so N processes with B rows each sample what one process with N * B
    # rows would (the rows of process p being rows p*B .. (p+1)*B - 1 of that batch)
    noise_shard: tuple[int, int] = (0, 1)


class Generator(Protocol):
    """A generation backend. `generate` samples one response per prompt row."""

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, rng: torch.Generator,
                 noise_rows: Optional[tuple[int, int]] = None) -> Rollout:
        """prompt_ids, prompt_mask: (B, P), left-padded. rng: the sampling noise, so that an
        iteration's samples depend only on the seed and the iteration (exact resume).
        noise_rows: (offset, total): these B rows are rows offset .. offset + B - 1 of a batch
        of `total` rows spread over processes, and draw that batch's noise for those rows;
        None: the rows of this process's shard (`SamplingParams.noise_shard`)."""

    def sync_weights(self) -> None:
        """Called after every policy update. Backends that share the policy's parameters (both
        here) do nothing; an engine holding its own copy (vLLM) receives them here."""

    def close(self) -> None:
        """Release what the backend holds beyond the policy (an engine); called once at the end."""


def truncate_scores(scores: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf the scores (tempered logits, (..., V)) of tokens that top-k / top-p sampling
    can never draw; softmax of the result is the distribution such a sampler draws from."""
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) > top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores


def noise_window(B: int, params: SamplingParams,
                 noise_rows: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """(offset, total) of B rows in the batch whose noise each step draws (see `Generator`)."""
    if noise_rows is not None:
        offset, total = noise_rows
        if offset < 0 or offset + B > total:
            raise ValueError(f"noise rows {offset}..{offset + B - 1} lie outside a batch of {total}")
        return offset, total
    shard, shards = params.noise_shard
    return shard * B, shards * B


def sample_next_token(logits: Tensor, params: SamplingParams, rng: torch.Generator,
                      noise_rows: Optional[tuple[int, int]] = None) -> Tensor:
    """Draw one token per row from softmax(logits / T), optionally truncated by top-k/top-p.

    logits: (B, V) any float dtype. noise_rows: as in `Generator.generate`. Returns (B,) long.
    Inverse-CDF sampling: one uniform per row and a binary search in the cumulative
    probabilities. That needs B random numbers where torch.multinomial or an exponential race
    draw B x V (7x slower for a 4k vocabulary on CPU), and it never syncs with the host on a GPU.
    """
    scores = truncate_scores(logits.float() / params.temperature, params.top_k, params.top_p)
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    # Scaled by the row's total, so rounding in the cumsum can never push u past the end.
    B = cdf.shape[0]
    offset, total = noise_window(B, params, noise_rows)
    u = torch.rand((total, 1), generator=rng, device=cdf.device)[offset:offset + B]
    u = u * cdf[:, -1:]
    # The first token whose cumulative probability exceeds u; a zero-probability token never is.
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return token.clamp_(max=cdf.shape[-1] - 1)


def finish_responses(prompt_ids: Tensor, prompt_mask: Tensor, sampled: Tensor,
                     params: SamplingParams) -> Rollout:
    """Cut sampled tokens at their first EOS, pad after it, and pad on the right up to T.

    sampled: (B, T') long with T' <= T, what a backend produced (anything after an EOS is
    ignored). Returns the Rollout with response_ids (B, T).
    """
    B, n = sampled.shape
    if n < params.max_new_tokens:
        fill = sampled.new_full((B, params.max_new_tokens - n), params.pad_token_id)
        sampled = torch.cat([sampled, fill], dim=1)
    if params.eos_token_ids:
        mask = response_mask(sampled, params.eos_token_ids)
        eos = torch.tensor(params.eos_token_ids, device=sampled.device)
        ended = (torch.isin(sampled, eos) & mask.bool()).any(-1)
    else:
        mask, ended = torch.ones_like(sampled), torch.zeros(B, dtype=torch.bool, device=sampled.device)
    if n < params.max_new_tokens:  # the backend stopped early: its missing tail is not response
        mask[:, n:] = 0
    responses = torch.where(mask.bool(), sampled, torch.full_like(sampled, params.pad_token_id))
    return Rollout(prompt_ids, prompt_mask, responses, mask, ended)


def _accepts(model: Any, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return name in params


def all_finished(finished: Tensor, collective: bool) -> bool:
    """Every row has ended; with `collective`, on every process (each forward of a sharded
    model gathers weights from all of them, so they must all run the same number of steps)."""
    done = finished.all()
    if collective:
        import torch.distributed as dist

        flag = done.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        done = flag
    return bool(done)


class KVCacheSampler:
    """Batched sampling over left-padded prompts with a KV cache.

    The prefill is the model's own forward. Each further token goes through the fused decode
    step of `tether.rollout.decode` when it supports the model (fused=True, the default), and
    through the model's own forward with its cache otherwise.
    """

    def __init__(self, model: Any, params: SamplingParams, fused: bool = True, gather: bool = False):
        self.model = model
        self.params = params
        self.gather = gather
        self._keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self.decoder = decoder_for(model) if fused else None
        # the KV cache's keyword: `cache` since transformers 5.24, `past_key_values` before
        self._cache_arg = cache_keyword(model)
        # A sharded model's forward is a collective (--fsdp): every process runs as many steps
        from tether.training.fsdp import is_sharded

        self._collective = is_sharded(model)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, rng: torch.Generator,
                 noise_rows: Optional[tuple[int, int]] = None) -> Rollout:
        with _sampling_context(self.model, self.gather and self._collective):
            return self._generate(prompt_ids, prompt_mask, rng, noise_rows)

    def _generate(self, prompt_ids: Tensor, prompt_mask: Tensor, rng: torch.Generator,
                  noise_rows: Optional[tuple[int, int]]) -> Rollout:
        p = self.params
        B, P = prompt_ids.shape
        noise_rows = noise_window(B, p, noise_rows)
        was_training = self.model.training
        self.model.eval()  # no gradient checkpointing, so the cache is used
        # The attention mask grows by one column a step: allocate it once, slice it per step.
        mask = torch.ones((B, P + p.max_new_tokens), dtype=prompt_mask.dtype, device=prompt_mask.device)
        mask[:, :P] = prompt_mask
        positions = position_ids_from_mask(prompt_mask)
        next_position = positions[:, -1:] + 1  # (B, 1): where the first response token goes
        eos = torch.tensor(p.eos_token_ids, device=prompt_ids.device, dtype=prompt_ids.dtype)
        sampled = prompt_ids.new_full((B, p.max_new_tokens), p.pad_token_id)
        finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        # Prefill: logits of the last position only (the rest would be (B, P, V) of waste), and
        # once per distinct prompt when rows repeat prompts (G samples per prompt): the cache is
        # then repeated to the rows (models/prefix.py).
        groups = shareable_groups(self.model, prompt_ids, prompt_mask, P)
        rows = groups.first if groups is not None else slice(None)
        out = self.model(input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows],
                         position_ids=positions[rows], use_cache=True, **self._keep)
        logits = out.logits[:, -1]
        if groups is not None:
            output_cache(out).reorder_cache(groups.inverse)
            logits = logits[groups.inverse]
        fused = self.decoder if self.decoder and self.decoder.fits(P + p.max_new_tokens) else None
        if fused:
            fused.start(output_cache(out), prompt_mask, P + p.max_new_tokens)
        n = 0
        for t in range(p.max_new_tokens):
            token = sample_next_token(logits, p, rng, noise_rows)
            token = torch.where(finished, torch.full_like(token, p.pad_token_id), token)
            sampled[:, t] = token
            n = t + 1
            if p.eos_token_ids:
                finished |= torch.isin(token, eos)
                if all_finished(finished, self._collective):  # a host sync per token
                    break
            if n == p.max_new_tokens:
                break
            if fused:
                logits = fused.step(token, next_position[:, 0] + t)
                continue
            out = self.model(input_ids=token[:, None], attention_mask=mask[:, :P + n],
                             position_ids=next_position + t, use_cache=True,
                             **{self._cache_arg: output_cache(out)})
            logits = out.logits[:, -1]
        if fused:
            fused.finish()
        self.model.train(was_training)
        return finish_responses(prompt_ids, prompt_mask, sampled[:, :n], p)

    def sync_weights(self) -> None:
        """Nothing to do: the sampler runs the live policy."""

    def close(self) -> None:
        """Nothing is held beyond the policy."""

    def session(self) -> Optional["TurnSession"]:
        """A `TurnSession` for the turns of one batch of episodes, which keeps the KV cache
        from turn to turn; None where the fused decode step does not run this model (then each
        turn prefills its whole context)."""
        if self.decoder is None or self._collective:
            return None
        return TurnSession(self)


class HFGenerator:
    """transformers' generate() with the same sampling parameters."""

    def __init__(self, model: Any, params: SamplingParams, gather: bool = False):
        from tether.training.fsdp import is_sharded

        self.model = model
        self.params = params
        self.gather = gather
        self._collective = is_sharded(model)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, rng: torch.Generator,
                 noise_rows: Optional[tuple[int, int]] = None) -> Rollout:
        from transformers import GenerationConfig

        p = self.params
        config = GenerationConfig(
            do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            max_new_tokens=p.max_new_tokens, pad_token_id=p.pad_token_id,
            eos_token_id=list(p.eos_token_ids) or None,
            # without EOS ids, HF would fall back to the model's own: forbid them instead
            min_new_tokens=p.max_new_tokens if not p.eos_token_ids else None, use_cache=True)
        # generate() draws its own noise: seed it apart per process (the same seed everywhere
        # would give every process the same noise), though not as one process would draw it
        offset = noise_window(prompt_ids.shape[0], p, noise_rows)[0]
        seed = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device)) + offset
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        # a sharded model's forward is a collective: synced_gpus keeps every process stepping
        # until all have finished (the name is transformers'; it applies on CPUs too)
        synced = {"synced_gpus": True} if self._collective else {}
        with torch.random.fork_rng(devices=devices), \
                _sampling_context(self.model, self.gather and self._collective):
            torch.manual_seed(seed)  # generate() draws from the global RNG
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                      generation_config=config, **synced)
        self.model.train(was_training)
        return finish_responses(prompt_ids, prompt_mask, out[:, prompt_ids.shape[1]:], p)

    def sync_weights(self) -> None:
        """Nothing to do: generate() runs the live policy."""

    def close(self) -> None:
        """Nothing is held beyond the policy."""


def make_generator(backend: str, model: Any, params: SamplingParams, gather: bool = False,
                   engine: Optional[dict] = None) -> Generator:
    """gather: for a sharded (--fsdp) model, keep its gathered weights for the whole of each
    rollout rather than gathering them again for every token (`training/fsdp.gathered`).
    engine: for backend "vllm", the keyword arguments of `rollout.vllm_engine.VLLMGenerator`
    beyond the model and the sampling parameters (the checkpoint to start from, dtype, ...)."""
    if backend == "hf":
        return HFGenerator(model, params, gather)
    if backend == "vllm":
        from tether.rollout.vllm_engine import VLLMGenerator

        return VLLMGenerator(model, params, **(engine or {}))
    return KVCacheSampler(model, params, gather=gather)


@contextlib.contextmanager
def sampling_params(generator: Any, **changes: Any) -> Any:
    """The generator samples with these SamplingParams fields changed for the duration (every
    backend reads its `params` at each generate call): an episode's turns have their own token
    limit and stop tokens."""
    from dataclasses import replace

    before = generator.params
    generator.params = replace(before, **changes)
    try:
        yield generator
    finally:
        generator.params = before


def _sampling_context(model: Any, gather: bool) -> Any:
    if not gather:
        return contextlib.nullcontext()
    from tether.training.fsdp import gathered

    return gathered(model)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token lists -> (ids, mask), both (B, max_len) long, padded on the LEFT so that every
    prompt ends in the last column and every response starts right after it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


class TurnSession:
    """The turns of one batch of multi-turn episodes (tether.envs.episodes) sampled with one KV
    cache: the fused decode step's buffers (`tether.rollout.decode`) are kept from turn to turn,
    so a turn feeds only what its context adds to what the cache holds (the observation, and
    the last token of the turn before), rather than prefilling the whole episode again.

    Each row of a turn continues the cached row whose tokens share the longest prefix with its
    context (identical tokens give identical keys and values, so any such row will do); cached
    positions past that prefix (tokens sampled after a stop string the episode was cut at) are
    hidden. The added tokens are fed in one forward of the fused layers (`FusedDecoder.extend`),
    right-aligned so that every row's last one comes last; a row's stand-in (padding) columns
    are written but hidden. Only for models the fused step runs (`KVCacheSampler.session` gives
    None otherwise: the turns are then sampled by `generate` on the whole context).
    """

    def __init__(self, sampler: "KVCacheSampler"):
        self.sampler = sampler
        self.decoder = sampler.decoder
        self.held: list[list[int]] = []  # per cached row: the tokens its valid positions hold
        self.slots: list[list[int]] = []  # ... and those positions
        self.before: list[int] = []  # ... and how many of those tokens its last turn's context had
        self.started = False

    def close(self) -> None:
        if self.started:
            self.decoder.finish()
        self.started = False

    @torch.no_grad()
    def generate(self, contexts: list[list[int]], rng: torch.Generator) -> Rollout:
        model = self.sampler.model
        was_training = model.training
        model.eval()
        try:
            return self._generate(contexts, rng)
        finally:
            model.train(was_training)

    def _start(self, contexts: list[list[int]], device: Any) -> Tensor:
        """Prefill the contexts with the model's own forward; returns the last logits."""
        s, p = self.sampler, self.sampler.params
        ids, mask = left_pad(contexts, p.pad_token_id, device)
        positions = position_ids_from_mask(mask)
        out = s.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **s._keep)
        P = ids.shape[1]
        self.close()
        self.decoder.start(output_cache(out), mask, P + p.max_new_tokens)
        self.started = True
        self.held = [list(c) for c in contexts]
        self.slots = [list(range(P - len(c), P)) for c in contexts]
        return out.logits[:, -1]

    def _continue(self, contexts: list[list[int]], device: Any) -> Optional[Tensor]:
        """Select, extend and feed the cached rows; None when a context shares nothing with
        any of them (then the caller starts afresh)."""
        p, d = self.sampler.params, self.decoder
        index, common, j = [], [], 0
        for c in contexts:
            # the episodes come in the order they had: look from the last one on for the row
            # this context continues (it holds all of that row's context before its last turn)
            order = list(range(j, len(self.held))) + list(range(j))
            found = next((k for k in order if _common_prefix(self.held[k], c) >= self.before[k]), None)
            if found is None:  # not a continuation: the longest shared prefix, if any
                found = max(range(len(self.held)), key=lambda k: _common_prefix(self.held[k], c))
            length = _common_prefix(self.held[found], c)
            if length == 0 or length == len(c):  # nothing to continue, or nothing new to feed
                return None
            index.append(found)
            common.append(length)
            j = found + 1
        B = len(contexts)
        d.select(torch.tensor(index, device=device))
        held = [self.held[j][:n] for j, n in zip(index, common)]
        slots = [self.slots[j][:n] for j, n in zip(index, common)]
        stale = [(b, slot) for b, j in enumerate(index) for slot in self.slots[j][common[b]:]]
        if stale:
            rows, where = zip(*stale)
            d.hide(torch.tensor(rows, device=device), torch.tensor(where, device=device))
        added = [c[n:] for c, n in zip(contexts, common)]
        S = max(len(a) for a in added)
        d.grow(d.length + S + p.max_new_tokens)
        chunk, valid = left_pad(added, p.pad_token_id, device)
        start = torch.tensor([len(h) for h in held], device=device)
        positions = start[:, None] + (valid.cumsum(-1) - 1).clamp(min=0)
        for b in range(B):  # right-aligned: row b's tokens take the chunk's last len(added[b]) slots
            held[b].extend(added[b])
            slots[b].extend(range(d.length + S - len(added[b]), d.length + S))
        logits = d.extend(chunk, positions, valid.bool())
        self.held, self.slots = held, slots
        return logits

    def _generate(self, contexts: list[list[int]], rng: torch.Generator) -> Rollout:
        s, p, d = self.sampler, self.sampler.params, self.decoder
        device = s.model.lm_head.weight.device
        longest = max(len(c) for c in contexts) + p.max_new_tokens
        if not d.fits(longest + (d.length if self.started else 0)):
            self.close()  # a sliding window would cut in: the model's own forward, no reuse
            ids, mask = left_pad(contexts, p.pad_token_id, device)
            return s.generate(ids, mask, rng)
        logits = self._continue(contexts, device) if self.started else None
        if logits is None:
            logits = self._start(contexts, device)
        self.before = [len(c) for c in contexts]
        B = len(contexts)
        noise_rows = noise_window(B, p, None)
        eos = torch.tensor(p.eos_token_ids, device=device, dtype=torch.long)
        sampled = torch.full((B, p.max_new_tokens), p.pad_token_id, dtype=torch.long, device=device)
        fed = torch.zeros((B, p.max_new_tokens), dtype=torch.bool, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        position = torch.tensor([len(c) for c in contexts], device=device)
        start, n = d.length, 0
        for t in range(p.max_new_tokens):
            token = sample_next_token(logits, p, rng, noise_rows)
            token = torch.where(finished, torch.full_like(token, p.pad_token_id), token)
            sampled[:, t] = token
            n = t + 1
            real = ~finished  # this token is the row's own (its EOS included)
            if p.eos_token_ids:
                finished = finished | torch.isin(token, eos)
                if bool(finished.all()):
                    break
            if n == p.max_new_tokens:
                break
            logits = d.step(token, position, real)
            fed[:, t] = real
            position = position + real.long()
        # the fed tokens are cached: remember them (the last sampled one is not, yet)
        for b in range(B):
            kept = fed[b].nonzero().flatten().tolist()
            self.held[b].extend(sampled[b, kept].tolist())
            self.slots[b].extend(start + k for k in kept)
        empty = torch.zeros((B, 0), dtype=torch.long, device=device)
        return finish_responses(empty, empty, sampled[:, :n], p)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
