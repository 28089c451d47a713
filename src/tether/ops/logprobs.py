"""Per-token log-probabilities and entropies from causal-LM logits.

Everything here works chunk by chunk over the (batch, time) positions: a logits tensor of shape
(B, T, V) with a 150k vocabulary is gigabytes, so we never build a full float32 log_softmax
copy of it. Each chunk is upcast to float32 on its own (bf16 logsumexp loses the small
differences between logprobs that PPO ratios and KL depend on), reduced, and dropped. A policy
forward that also wants the entropy gets it from the same log_softmax pass
(`token_logprobs_and_entropy`).
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# 2**26 float32 elements = 256 MiB per chunk: small next to the logits themselves, big enough
# that a batch of short sequences is still done in a single chunk.
DEFAULT_CHUNK_ELEMENTS = 2**26


def _chunks(B: int, T: int, V: int, max_elements: int):
    """Yield (batch slice, time slice) pairs that tile a (B, T) grid, each covering at most
    `max_elements` logits (but at least one position). Whole rows where they fit, since
    slicing the batch dimension keeps views of non-contiguous logits (e.g. logits[:, :-1])."""
    if T * V <= max_elements:
        rows = max(1, max_elements // (T * V))
        for b in range(0, B, rows):
            yield slice(b, b + rows), slice(0, T)
        return
    steps = max(1, max_elements // V)  # one row is too big: split it along time as well
    for b in range(B):
        for t in range(0, T, steps):
            yield slice(b, b + 1), slice(t, t + steps)


def _scaled_float(chunk: Tensor, temperature: float) -> Tensor:
    """Upcast a logits chunk to float32 and divide by the temperature. At temperature 1.0
    there is no division, and float32 input is not copied at all."""
    chunk = chunk.float()
    if temperature != 1.0:
        chunk = chunk / temperature  # out of place: never modify the caller's logits
    return chunk


def _entropy(log_p: Tensor) -> Tensor:
    """-sum p log p over the last dim, from a log_softmax; p * log p is formed in place."""
    return -log_p.exp().mul_(log_p).sum(-1)


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits / T)[..., y] (and, if asked, the entropy), chunk by chunk, with a
    backward that keeps only the logits.

    Forward: per chunk, one fused log_softmax, a gather and optionally the entropy; nothing of
    the (.., V) log_softmax is saved. Backward: d/dlogits = (onehot(y) - softmax(logits / T)) / T
    times the incoming gradient, per chunk, in one softmax pass plus in-place ops, written into
    the gradient in the logits' dtype. On CPU this forward + backward takes about half the time
    of `x[y] - logsumexp(x)` differentiated by autograd, whose backward runs three full passes
    and allocates three (.., V) tensors. The entropy output has no gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, max_elements: int,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        B, T, V = logits.shape
        out = torch.empty((B, T), dtype=torch.float32, device=logits.device)
        entropy = torch.empty((B, T) if with_entropy else (0,), dtype=torch.float32, device=logits.device)
        for bs, ts in _chunks(B, T, V, max_elements):
            log_p = torch.log_softmax(_scaled_float(logits[bs, ts], temperature), dim=-1)
            out[bs, ts] = log_p.gather(-1, tokens[bs, ts].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                entropy[bs, ts] = _entropy(log_p)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.max_elements = temperature, max_elements
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _entropy_grad: Tensor) -> tuple:
        logits, tokens = ctx.saved_tensors
        B, T, V = logits.shape
        chunks = list(_chunks(B, T, V, ctx.max_elements))
        grad_logits = None
        for bs, ts in chunks:
            g = grad[bs, ts].unsqueeze(-1)
            part = torch.softmax(_scaled_float(logits[bs, ts], ctx.temperature), dim=-1).mul_(-g)
            part.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), g)
            if ctx.temperature != 1.0:  # d(logits / T) / d logits, applied last as autograd would
                part.div_(ctx.temperature)
            if len(chunks) == 1:  # no second (B, T, V) tensor to copy it into
                return part.to(logits.dtype), None, None, None, None
            if grad_logits is None:
                grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            grad_logits[bs, ts] = part
        return grad_logits, None, None, None, None


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """log p(tokens) under softmax(logits / temperature).

    Args:
        logits: shape (B, T, V), any float dtype. logits[:, t] is the distribution that
            tokens[:, t] was drawn from: the caller has already shifted them.
        tokens: shape (B, T) long, valid vocabulary ids (no -100).
        temperature: the sampling temperature; rollout, policy and reference must all use the
            same one or the KL between them is meaningless.
        max_chunk_elements: at most this many logits are upcast at a time.

    Returns:
        shape (B, T) float32, differentiable with respect to the logits.
    """
    return token_logprobs_and_entropy(logits, tokens, temperature, entropy=False,
                                      max_chunk_elements=max_chunk_elements)[0]


def token_logprobs_and_entropy(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    entropy: bool = True,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs` and, from the same log_softmax pass, the entropy of softmax(logits /
    temperature) at every position: ((B, T) float32, (B, T) float32 without gradient, or None
    when entropy=False)."""
    B, T, V = logits.shape
    if B * T == 0:
        empty = torch.empty((B, T), dtype=torch.float32, device=logits.device)
        return empty, (empty.clone() if entropy else None)
    out, ent = _TokenLogprobs.apply(logits, tokens, temperature, max_chunk_elements, entropy)
    return out, (ent if entropy else None)


def entropy_from_logits(
    logits: Tensor,
    temperature: float = 1.0,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Entropy of softmax(logits / temperature) at every position.

    Args:
        logits: shape (B, T, V), any float dtype.
        temperature: divides the logits first, as in `token_logprobs`.

    Returns:
        shape (B, T) float32, in nats.
    """
    B, T, V = logits.shape
    out = torch.empty((B, T), dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    for bs, ts in _chunks(B, T, V, max_chunk_elements):
        out[bs, ts] = _entropy(torch.log_softmax(_scaled_float(logits[bs, ts], temperature), dim=-1))
    return out


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Summed log-probability of the scored tokens of each sequence, under
    softmax(logits / temperature).

    Args:
        logits: shape (B, L, V) from a causal LM run over input_ids of shape (B, L).
        labels: shape (B, L) long, aligned with input_ids (Hugging Face convention, not
            shifted), `ignore_index` where a token is not scored (prompt, padding).
            The shift happens here: logits[:, t] predicts labels[:, t + 1].
        temperature: as in `token_logprobs`; the logits are scaled chunk by chunk, never copied
            whole.

    Returns:
        (logprob_sum, num_tokens): logprob_sum shape (B,) float32, the sum of log p over the
        scored tokens of each row; num_tokens shape (B,) long, how many tokens were scored.
    """
    targets = labels[:, 1:]
    scored = targets != ignore_index
    # -100 is not a vocabulary id; gather any valid id there and zero it out below.
    safe_targets = targets.masked_fill(~scored, 0)
    logps = token_logprobs(
        logits[:, :-1], safe_targets, temperature, max_chunk_elements=max_chunk_elements
    )
    logps = torch.where(scored, logps, torch.zeros_like(logps))
    return logps.sum(-1), scored.sum(-1)
