"""Supervised fine-tuning: next-token cross-entropy on the scored (response) tokens."""

from torch import Tensor

from tether.ops.logprobs import sequence_logprobs


def sft_loss(
    logits: Tensor, labels: Tensor, normalizer: float | Tensor | None = None
) -> tuple[Tensor, dict]:
    """Summed token NLL over scored tokens, divided by `normalizer`.

    Args:
        logits: shape (B, L, V) from a causal LM over input_ids (B, L).
        labels: shape (B, L) long, aligned with input_ids (Hugging Face convention; shifted
            here), -100 on tokens that are not scored (prompt, padding).
        normalizer: what to divide the summed NLL by; defaults to the number of scored
            tokens in this batch. Pass the token count of the whole global batch (across
            devices and accumulation steps) so every token weighs the same; averaging
            per-micro-batch means would over-weight tokens of short micro-batches.

    Returns:
        (loss 0-dim, stats) with detached `sft/tokens` (scored tokens in this batch) and
        `sft/nll_sum` (summed NLL in this batch).
    """
    # Built on sequence_logprobs, which never builds a full (B, L, V) log_softmax copy.
    logprob_sums, num_tokens = sequence_logprobs(logits, labels)
    nll_sum = -logprob_sums.sum()
    tokens = num_tokens.sum()
    if normalizer is None:
        normalizer = tokens.clamp(min=1)  # a batch with nothing scored gives loss 0, not NaN
    loss = nll_sum / normalizer
    stats = {"sft/tokens": tokens.detach(), "sft/nll_sum": nll_sum.detach()}
    return loss, stats
