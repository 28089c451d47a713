"""One prompt pass per distinct prompt: the forward passes over a batch whose rows repeat prompts.

GRPO and RLOO sample G responses per prompt, so each prompt appears G times in a batch, next to
each other, with the same left padding. Every forward over such a batch (the rollout's prefill,
the reference's logprobs, the policy's own forward in the update) would compute the prompt's
hidden states G times over. Here the prompts are computed once per distinct prompt, the
resulting KV cache is repeated to the batch's rows (`Cache.reorder_cache`, the public method
beam search uses), and the responses are fed on top of it:

- prompt pass: the distinct prompts without their last token, with a cache;
- response pass: every row's last prompt token and its response tokens (but the last), on the
  repeated cache. Its logits are exactly those that predict the response tokens, so nothing is
  concatenated or sliced afterwards.

It is the same function as the model's forward on the whole rows, up to float rounding, and
gradients flow through the repeated cache back to the prompt pass. It runs through the model's
own forward and public cache API; still, a release could change what a cache keyword means, so
`GUARD` holds it to the releases it was tested on and to a probe (outputs and gradients
against the whole-row forward) on each model before its first use, as `tether.models.guard`
does for the other fast paths. It steps aside (the plain forward runs) when fewer than half the
rows are repeats, for prompts of one token, under gradient checkpointing (transformers turns
the cache off there) and for models sharded with FSDP (a module called twice in one forward).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from tether.models.guard import FastPath, mismatch

# Two verdicts per model: its outputs (what sampling and the reference need) and, for a forward
# whose gradients are used, its outputs and gradients. A pass without gradients never runs the
# backward probe: autograd is then never started in a process that only samples (bon, eval).
GUARD = FastPath("tether.models.prefix (one prompt pass per distinct prompt)")
GUARD_GRADIENTS = FastPath("tether.models.prefix (one prompt pass per distinct prompt, with gradients)")


class PromptGroups(NamedTuple):
    first: Tensor  # (U,) long: one row of each distinct prompt
    inverse: Tensor  # (B,) long: which of the U distinct prompts each row has


def prompt_groups(input_ids: Tensor, attention_mask: Tensor, n_prompt: int) -> Optional[PromptGroups]:
    """The distinct prompts of a batch (the first n_prompt columns, ids and mask), or None when
    fewer than half the rows repeat another row's prompt (then sharing saves too little)."""
    B = input_ids.shape[0]
    if B < 2 or n_prompt < 2:
        return None
    key = torch.cat([input_ids[:, :n_prompt], attention_mask[:, :n_prompt].to(input_ids.dtype)], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    U = distinct.shape[0]
    if 2 * U > B:
        return None
    rows = torch.arange(B, device=input_ids.device)
    first = torch.full((U,), B, dtype=torch.long, device=input_ids.device).scatter_reduce(
        0, inverse, rows, reduce="amin")
    return PromptGroups(first, inverse)


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either of its names."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _inner(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_keyword(model: Any) -> str:
    """The forward's keyword for a KV cache: `cache` since transformers 5.24, `past_key_values`
    before."""
    return "cache" if "cache" in inspect.signature(_inner(model).forward).parameters else "past_key_values"


def accepts_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(_inner(model).forward).parameters


def usable(model: Any) -> bool:
    """Whether `shared_logits` may run on `model` at all (before its probe)."""
    from tether.training.fsdp import is_sharded

    inner = _inner(model)
    checkpointing = inner.training and any(getattr(m, "gradient_checkpointing", False) is True
                                           for m in inner.modules())
    return not checkpointing and not is_sharded(model)


def shared_logits(lm: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                  n_response: int, groups: PromptGroups) -> Tensor:
    """The logits that predict the last n_response tokens of each (B, L) row, (B, n_response,
    V), with the first L - n_response - 1 columns (the prompt but its last token) computed once
    per distinct prompt. The rows of one group must share those columns (`prompt_groups`)."""
    P = input_ids.shape[1] - n_response  # prompt columns
    first, inverse = groups
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(lm) else {}
    head = lm(input_ids=input_ids[first, :P - 1], attention_mask=attention_mask[first, :P - 1],
              position_ids=position_ids[first, :P - 1], use_cache=True, **keep)
    cache = output_cache(head)
    cache.reorder_cache(inverse)  # (U, ...) -> (B, ...): index_select, differentiable
    out = lm(input_ids=input_ids[:, P - 1:-1], attention_mask=attention_mask[:, :-1],
             position_ids=position_ids[:, P - 1:-1], use_cache=True, **{cache_keyword(lm): cache})
    return out.logits


def shareable_groups(model: Any, input_ids: Tensor, attention_mask: Tensor,
                     n_prompt: int) -> Optional[PromptGroups]:
    """The batch's distinct prompts when a shared prompt pass applies both to the batch
    (`prompt_groups`) and to `model` (`usable`, then `trusted`); else None."""
    if not usable(model):
        return None
    groups = prompt_groups(input_ids, attention_mask, n_prompt)
    return groups if groups is not None and trusted(model) else None


def trusted(lm: Any) -> bool:
    """The release is a verified one and the probe passed on this model: the outputs' probe for
    a pass without gradients, the outputs' and gradients' for one with them (see `GUARD`)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in lm.parameters()):
        return GUARD_GRADIENTS.trusted(lm, lambda: _probe(lm, gradients=True))
    return GUARD.trusted(lm, lambda: _probe(lm, gradients=False))


def _probe(lm: Any, gradients: bool) -> Optional[str]:
    """Two prompts, two responses each, one prompt left-padded: the logits and, with
    `gradients`, the gradients of a weighted sum of them, against the whole-row forward.
    Gradients are taken with autograd.grad, so nothing accumulates into .grad."""
    weight = lm.get_output_embeddings().weight
    device, vocab = weight.device, lm.get_output_embeddings().weight.shape[0]
    P, T = 5, 3
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (2, P), generator=g).repeat_interleave(2, dim=0)
    ids = torch.cat([prompts, torch.randint(0, vocab, (4, T), generator=g)], dim=1).to(device)
    mask = torch.ones_like(ids)
    mask[2:, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    groups = prompt_groups(ids, mask, P)
    if groups is None or groups.first.numel() != 2:
        return "its probe batch did not group into two prompts"
    params = [p for p in lm.parameters() if p.requires_grad] if gradients else []
    was_training = lm.training
    lm.eval()
    try:
        with torch.set_grad_enabled(bool(params)):
            whole = lm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                       use_cache=False).logits[:, -T:]
            ours = shared_logits(lm, ids, mask, pos, T, groups)
            if params:
                w = torch.randn(whole.shape, generator=g).to(device=device, dtype=whole.dtype)
                theirs_grad = torch.autograd.grad((whole * w).sum(), params, allow_unused=True)
                ours_grad = torch.autograd.grad((ours * w).sum(), params, allow_unused=True)
    finally:
        lm.train(was_training)
    problem = mismatch("logits", ours, whole)
    if problem is not None or not params:
        return problem and f"its probe disagrees with the model: {problem}"
    if any((a is None) != (b is None) for a, b in zip(ours_grad, theirs_grad)):
        return "its probe disagrees with the model: a parameter's gradient is missing"
    # All gradients as one vector, held to a share of the largest: a parameter whose gradient is
    # zero in exact arithmetic (a key bias: it shifts all of a query's scores alike, and softmax
    # ignores that) has only rounding noise, which per parameter would count as a mismatch.
    flat = [(a.flatten(), b.flatten()) for a, b in zip(ours_grad, theirs_grad) if a is not None]
    if flat and (problem := mismatch("the gradients", torch.cat([a for a, _ in flat]),
                                     torch.cat([b for _, b in flat]))) is not None:
        return f"its probe disagrees with the model: {problem}"
    return None
