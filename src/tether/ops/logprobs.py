"""Per-token log-probabilities and entropies from causal-LM logits.

Everything here works chunk by chunk over the rows of the batch: a logits tensor of shape
(B, T, V) with a 150k vocabulary is gigabytes, so we never build a full float32 log_softmax
copy of it. Each chunk is upcast to float32 on its own (bf16 logsumexp loses the small
differences between logprobs that PPO ratios and KL depend on), reduced, and dropped.
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


class _GatherLogSoftmax(torch.autograd.Function):
    """log_softmax(x)[..., y] with a backward that keeps only x.

    Forward: one fused log_softmax pass, then a gather; the (.., V) log_softmax output is a
    temporary, not saved. Backward: d/dx = onehot(y) - softmax(x), times the incoming gradient,
    built in one softmax pass plus in-place ops. On CPU this forward + backward takes about half
    the time of `x[y] - logsumexp(x)` differentiated by autograd (whose backward runs three full
    passes and allocates three (.., V) tensors), and it saves the same tensor (x) for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, tokens: Tensor) -> Tensor:
        index = tokens.unsqueeze(-1)
        ctx.save_for_backward(x, index)
        return torch.log_softmax(x, dim=-1).gather(-1, index).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, index = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_x = torch.softmax(x, dim=-1).mul_(-g)
        grad_x.scatter_add_(-1, index, g)
        return grad_x, None


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
        shape (B, T) float32.
    """
    B, T, V = logits.shape
    out = torch.empty((B, T), dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    for bs, ts in _chunks(B, T, V, max_chunk_elements):
        x = _scaled_float(logits[bs, ts], temperature)
        out[bs, ts] = _GatherLogSoftmax.apply(x, tokens[bs, ts])
    return out


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
        x = _scaled_float(logits[bs, ts], temperature)
        # H = -sum p log p, from one fused log_softmax pass; p * log p is formed in place.
        log_p = torch.log_softmax(x, dim=-1)
        out[bs, ts] = -log_p.exp().mul_(log_p).sum(-1)
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
