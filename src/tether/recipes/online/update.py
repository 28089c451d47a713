"""The online loop's policy-side passes: old logprobs (and PPO's values), and the update over
minibatches and micro-batches, with the running method's loss (its `Algorithm.loss`).

With one minibatch (the default), the first epoch's forward pass runs BEFORE the advantages
are computed: its detached logprobs and values are pi_old and V_old (the weights have not moved
yet, so the ratio is exactly 1), and its graph is then reused for the first update. A separate
no-grad scoring pass over the batch is needed only with several minibatches, because every
minibatch's advantages must be known before the first optimizer step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from tether.losses.sft import sft_loss
from tether.ops.logprobs import token_logprobs_and_entropy
from tether.ops.masking import masked_mean
from tether.rollout.score import row_chunks
from tether.rollout.types import Experience, Sequences
from tether.training.collectives import any_process
from tether.training.fsdp import plain
from tether.training.optim import check_step_finite

if TYPE_CHECKING:
    from tether.recipes.online.setup import OnlineParts


@dataclass
class PolicyOutput:
    """One forward of the policy (and critic) over a batch of sequences."""

    logprobs: Tensor  # (B, T) float32, log pi_theta(y_t) at the sampling temperature
    values: Optional[Tensor]  # (B, T) float32, V(x, y_<t); None without a critic
    entropy: Optional[Tensor] = None  # (B, T) float32 without gradient, when asked for


def forward_policy(parts: "OnlineParts", seqs: Sequences, entropy: bool = False) -> PolicyOutput:
    """Policy logprobs (response positions only) and values: with --critic head one trunk pass
    gives both; with a separate critic, the critic runs its own pass. entropy: also the
    policy's entropy at each response position, from the same log_softmax pass."""
    T = seqs.response_ids.shape[1]
    args = (seqs.input_ids, seqs.attention_mask, seqs.position_ids, T)
    logits, values = parts.actor(*args)
    if parts.critic is not None:
        values = parts.critic(*args)
    logprobs, ent = token_logprobs_and_entropy(logits, seqs.response_ids, parts.cfg.temperature,
                                               entropy=entropy)
    return PolicyOutput(logprobs, values, ent)


def mean_entropy(out: PolicyOutput, mask: Tensor) -> Tensor:
    """Masked mean entropy (nats per token) of a forward run with entropy=True: 0-dim."""
    return masked_mean(out.entropy, mask)


@torch.no_grad()
def score_old_policy(parts: "OnlineParts", seqs: Sequences,
                     chunk: int = 0) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(logprobs (B, T), values (B, T) or None without a critic, mean entropy 0-dim) under the
    current weights, without gradients: the scoring pass needed when the update has several
    minibatches."""
    logprobs, values, entropy_sum, tokens = [], [], 0.0, 0.0
    for rows in row_chunks(seqs.input_ids.shape[0], chunk):
        part = seqs.rows(torch.arange(seqs.input_ids.shape[0])[rows])
        out = forward_policy(parts, part, entropy=True)
        logprobs.append(out.logprobs)
        values.append(out.values)
        n = part.response_mask.sum()
        entropy_sum = entropy_sum + mean_entropy(out, part.response_mask) * n
        tokens = tokens + n
    values = torch.cat(values) if values[0] is not None else None
    return torch.cat(logprobs), values, entropy_sum / max(float(tokens), 1.0)


def minibatch_order(batch_size: int, minibatch: int, seed: int, step: int, epoch: int,
                    unit: int = 1) -> list[Tensor]:
    """Row indices of each minibatch of one epoch: a fresh permutation decided by the seed alone.
    unit > 1: blocks of `unit` neighbouring rows (a preference pair) are permuted as wholes."""
    if minibatch >= batch_size:
        return [torch.arange(batch_size)]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + epoch)
    order = torch.randperm(batch_size // unit, generator=gen)
    if unit > 1:
        order = (order[:, None] * unit + torch.arange(unit)).flatten()
    return list(order.split(minibatch))


def update(parts: "OnlineParts", exp: Experience, step: int,
           first: Optional[PolicyOutput] = None) -> dict[str, Tensor]:
    """--ppo-epochs passes over the buffer, one optimizer step per minibatch.

    first: the forward already run on the whole batch (one minibatch only); it serves as the
    first epoch's forward. Returns the mean of each statistic over all minibatch steps.
    """
    cfg, unit = parts.cfg, parts.algorithm.unit
    B = exp.size
    stats: dict[str, list[Tensor]] = defaultdict(list)
    per_epoch = max(1, B // cfg.minibatch)
    for epoch in range(cfg.ppo_epochs):
        for k, rows in enumerate(minibatch_order(B, cfg.minibatch, cfg.seed, step, epoch, unit)):
            whole = rows.numel() == B
            reuse = first if (epoch == 0 and whole) else None
            ptx_index = ((step - 1) * cfg.ppo_epochs + epoch) * per_epoch + k  # never repeats
            row = minibatch_step(parts, exp if whole else exp.rows(rows), reuse, ptx_index,
                                 f"iteration {step} (epoch {epoch + 1}, minibatch {k + 1})")
            for key, value in row.items():
                stats[key].append(value)
    return {key: torch.stack(values).mean() for key, values in stats.items()}


def minibatch_step(parts: "OnlineParts", mb: Experience, out: Optional[PolicyOutput],
                   ptx_index: int, where: str = "this minibatch") -> dict[str, Tensor]:
    """One optimizer step on a minibatch: the method's loss (+ PPO-ptx's), backward over
    micro-batches of --micro-batch-size rollouts, gradient clipping, optimizer step.

    Each micro-batch's loss (a mean over its response tokens) is weighted by its share of the
    minibatch's response tokens, so the accumulated gradient and the returned statistics are
    those of the whole minibatch. With several processes the share is of all processes' tokens
    (times the number of processes, as DDP averages their gradients), so a process with longer
    responses weighs more, as it would in one process. Under DDP, gradients are synchronised on
    the last backward only.
    """
    cfg, algorithm = parts.cfg, parts.algorithm
    B, world, all_reduce = mb.size, parts.accelerator.num_processes, parts.all_reduce_sum()
    micro = B if out is not None else min(cfg.micro, B)
    tokens = mb.mask.sum().clamp(min=1)
    if all_reduce is not None:  # the mean token count per process, over all processes
        tokens = all_reduce(mb.mask.sum().float()).clamp(min=1) / world
    row: dict[str, Tensor] = {}
    by_rows = algorithm.mean_over == "rows"
    for start in range(0, B, micro):
        whole, last = micro >= B, start + micro >= B
        part = mb if whole else mb.rows(torch.arange(start, min(start + micro, B)))
        if whole and world == 1:
            weight = 1.0
        elif by_rows:  # a mean over responses: each micro-batch weighs by its share of them
            weight = part.size / B
        else:  # a mean over tokens: by its share of the response tokens
            weight = part.mask.sum() / tokens
        with ExitStack() as stack:
            if not last:  # accumulate locally; DDP all-reduces on the last backward
                for _, model, _ in parts.trainables():
                    stack.enter_context(parts.accelerator.no_sync(model))
            loss, stats = algorithm.loss(parts, part, out if whole else None)
            loss = loss * weight
            if last and parts.ptx is not None:  # once per minibatch, with its last micro-batch
                ptx_loss = _ptx_loss(parts, ptx_index)
                loss = loss + cfg.ptx_coef * ptx_loss
            parts.accelerator.backward(loss)
        for key, value in stats.items():
            row[key] = row.get(key, 0.0) + value * weight
    if parts.ptx is not None:
        row["ptx/loss"] = ptx_loss.detach()
    # Every model's gradient norm (clipped only when asked), then one check: a non-finite loss
    # or norm stops the run before any weight of any model changes.
    norms = {}
    for name, model, _ in parts.trainables():
        params = [p for p in model.parameters() if p.requires_grad]
        norms[name] = plain(parts.accelerator.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf))
    # one host sync for all of them
    values = torch.stack([torch.as_tensor(n).float() for n in norms.values()]
                         + [loss.detach().float().reshape(())]).tolist()
    checked = {f"{name} gradient norm": v for name, v in zip(norms, values)}
    loss_ok = math.isfinite(values[-1])
    if world > 1:
        loss_ok = not any_process(parts.accelerator, not loss_ok)
    checked["loss"] = 0.0 if loss_ok else math.nan
    check_step_finite(checked, where, cfg.output_dir,
                      lambda: [opt.zero_grad(set_to_none=True) for _, _, opt in parts.trainables()])
    for name, model, optimizer in parts.trainables():
        if cfg.max_grad_norm > 0:
            row[f"{name}/grad_norm"] = torch.as_tensor(norms[name]).detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for (name, _, _), scheduler in zip(parts.trainables(), parts.schedulers):
        row[f"{name}/lr"] = torch.tensor(scheduler.get_last_lr()[0])  # the rate this step used
        scheduler.step()
    return row


def _ptx_loss(parts: "OnlineParts", ptx_index: int) -> Tensor:
    """PPO-ptx: the pretraining (SFT-style) loss on the ptx batch `ptx_index`, a mean over its
    tokens. With several processes each holds its share of the batch, and its summed NLL is
    divided by the mean token count per process: DDP's average of the gradients is then that
    of the mean over all the batch's tokens, as in one process."""
    batch = parts.ptx.batch(ptx_index, parts.device)
    normalizer, all_reduce = None, parts.all_reduce_sum()
    if all_reduce is not None:
        tokens = (batch["labels"][:, 1:] != -100).sum().float()
        normalizer = all_reduce(tokens).clamp(min=1) / parts.accelerator.num_processes
    logits = parts.policy_lm()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
    return sft_loss(logits, batch["labels"], normalizer)[0]
