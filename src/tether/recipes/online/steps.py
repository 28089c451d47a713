"""The steps every online method shares, written once: sample and score (steps 1-2), the old
policy's logprobs (2b), the sampler-trainer correction, and the iteration's end (6-7: metrics,
KL control, health checks). The method's own steps are its `Algorithm` hooks (algorithm.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from tether.ops.masking import masked_mean
from tether.ops.mismatch import mismatch_stats, truncated_is_weights
from tether.recipes.online.update import PolicyOutput, forward_policy, mean_entropy, score_old_policy
from tether.rollout.health import HealthIssue
from tether.rollout.reward_fns import trl_trainer_state
from tether.rollout.score import RewardScores
from tether.rollout.stats import batch_wide_metrics, experience_metrics
from tether.rollout.types import Experience, Rollout, Sequences
from tether.training.collectives import any_process, max_across_processes
from tether.training.memory import resident_mb

if TYPE_CHECKING:
    from tether.envs.episodes import Episodes
    from tether.recipes.online.data import PromptSet
    from tether.recipes.online.setup import OnlineParts


@dataclass
class IterationResult:
    metrics: dict[str, float]  # the fixed metric names of docs/metrics.md
    experience: Experience  # this iteration's buffer
    prompt_texts: list[str]
    issues: list[HealthIssue]


class PhaseClock:
    """Wall time per phase. On a GPU it synchronises at each lap, or the work queued by one
    phase would be billed to the next."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self.last = time.perf_counter()
        self.totals: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        self.lap("other")
        return {**{f"timing/{k}": v for k, v in self.totals.items() if k != "other"},
                "timing/iteration": self.last - self.start}


def sampling_rng(seed: int, step: int, device: torch.device, turn: int = 0) -> torch.Generator:
    """The sampling noise of iteration `step` (and of an episode's turn > 0): a function of the
    seed, the step and the turn only."""
    base = seed * 1_000_003 + step
    return torch.Generator(device=device).manual_seed(base if turn == 0 else base * 64 + turn)


@dataclass
class Sampled:
    """One iteration's rollouts, scored: what every method starts from."""

    rows: list[int]  # prompt index of each rollout (a prompt repeated G times for groups)
    texts: list[str]  # the prompts' texts, per rollout
    rollout: Rollout
    seqs: Sequences
    ref_logprobs: Tensor  # (B, T)
    scored: RewardScores
    stats: dict = field(default_factory=dict)  # the episodes' env/ metrics (with --env)
    # (B, T) with --env: each environment step's reward at the last token of its turn (`scored`
    # includes their sum), for the methods with per-token rewards
    turn_rewards: Optional[Tensor] = None


# Extra sampling rounds (dynamic sampling) draw the prompts and noise of "steps" this far apart,
# beyond any run's own: a function of the seed, the step and the round alone.
ROUND_STRIDE = 1_000_000


def sample_and_score(parts: "OnlineParts", step: int, clock: PhaseClock, repeat: int = 1,
                     round_: int = 0) -> Sampled:
    """Steps 1-2 of every method: the prompts of iteration `step` (each `repeat` times, the
    copies next to each other), one response per row at temperature T from left-padded prompts,
    the reference's logprobs (same T) and the rewards. round_ > 0: another draw of prompts and
    noise for the same iteration (dynamic sampling's refills)."""
    cfg, iteration = parts.cfg, step
    step = step + round_ * ROUND_STRIDE
    indices = parts.order.step_indices(step - 1, parts.accelerator.process_index)[0]
    rows = [i for i in indices for _ in range(repeat)]
    prompt_ids, prompt_mask, texts = parts.prompts.batch(rows, parts.tokenizer.pad_token_id, parts.device)
    episodes = None
    if parts.episodes is not None:
        episodes = run_episodes(parts, parts.prompts, rows, step)
        rollout = episodes.rollout
    else:
        rollout = parts.generator.generate(prompt_ids, prompt_mask, sampling_rng(cfg.seed, step, parts.device))
    seqs = rollout.sequences()
    clock.lap("rollout")
    ref_logprobs = parts.reference.logprobs(seqs, cfg.temperature)
    scored = parts.reward.score(seqs, texts, parts.prompts.chats_at(rows), parts.prompts.columns_at(rows),
                                parts.prompts.rows_at(rows), trl_trainer_state(iteration, cfg.max_steps),
                                transcripts=episodes.transcripts if episodes is not None else None)
    if episodes is None:
        return Sampled(rows, texts, rollout, seqs, ref_logprobs, scored)
    # the environments' rewards add to the RM's and the functions'; a skipped episode (it trains
    # nothing) is paid the batch's mean, so that it moves no other row's baseline much
    scores = scored.scores + episodes.rewards.to(scored.scores)
    skipped = episodes.skipped.to(scores.device)
    if bool(skipped.any()) and not bool(skipped.all()):
        scores = torch.where(skipped, scores[~skipped].mean(), scores)
    return Sampled(rows, texts, rollout, seqs, ref_logprobs, scored._replace(scores=scores),
                   episodes.metrics(), episodes.paid.to(scores.device))


def run_episodes(parts: "OnlineParts", prompts: "PromptSet", rows: list[int], step: int) -> "Episodes":
    """--env: one multi-turn episode per row of `prompts` (tether.envs.episodes), each turn
    sampled by the run's generator on the episodes so far, all active ones at once, with the
    noise of `step` (`sampling_rng`)."""
    from tether.envs.episodes import generator_turns

    device = parts.device
    sample = generator_turns(parts.generator, parts.eos_token_ids + parts.stop_token_ids,
                             parts.tokenizer.pad_token_id, device,
                             lambda turn: sampling_rng(parts.cfg.seed, step, device, turn))
    episodes = parts.episodes.run(
        [prompts.ids[i] for i in rows], prompts.records_at(rows), prompts.rows_at(rows),
        [c is not None for c in prompts.chats_at(rows)], sample,
        any_active=lambda active: any_process(parts.accelerator, active))
    r = episodes.rollout
    episodes.rollout = Rollout(*(t.to(device) if t is not None else None for t in (
        r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.ended, r.sampler_logprobs,
        r.response_attention)))
    return episodes


@dataclass
class OldPolicy:
    """pi_old (and V_old with a critic) on the batch, before any update."""

    logprobs: Tensor  # (B, T)
    values: Optional[Tensor]  # (B, T), None without a critic
    entropy: Tensor  # 0-dim, nats per response token
    first: Optional[PolicyOutput]  # the first update's forward, when it gave the above


def old_policy(parts: "OnlineParts", seqs: Sequences, clock: PhaseClock) -> OldPolicy:
    """Step 2b of every method. With one minibatch in one micro-batch, the first update epoch's
    forward gives pi_old and V_old (the weights have not moved, so the ratio is exactly 1) and
    its graph is reused by the update; otherwise a no-grad pass scores the batch."""
    if parts.cfg.reuses_first_forward:
        clock.lap("score")
        first = forward_policy(parts, seqs, entropy=True)
        clock.lap("update")
        values = first.values.detach() if first.values is not None else None
        return OldPolicy(first.logprobs.detach(), values, mean_entropy(first, seqs.response_mask), first)
    logprobs, values, entropy = score_old_policy(parts, seqs, chunk=parts.cfg.micro_batch_size)
    return OldPolicy(logprobs, values, entropy, None)


def sampler_correction(rollout_is_cap: Optional[float], rollout: Rollout,
                       exp: Experience) -> tuple[dict, Experience]:
    """When an engine with its own weights sampled the rollouts (vLLM): the sampler-trainer
    mismatch metrics, and with --rollout-is-cap the experience to train on, whose advantages
    carry the truncated importance weights (`ops/mismatch.py`). A weight w >= 0 per token
    scales that token's clipped policy term exactly as it scales its advantage, since
    w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r)); the value loss and the KL term
    are left as they are. A method without advantages (online DPO) gets the metrics only.
    Otherwise ({}, exp)."""
    if rollout.sampler_logprobs is None:
        return {}, exp
    mask = exp.mask
    stats = mismatch_stats(exp.logprobs, rollout.sampler_logprobs, mask)
    if rollout_is_cap is None or exp.advantages is None:
        return stats, exp
    weights = truncated_is_weights(exp.logprobs, rollout.sampler_logprobs, mask, rollout_is_cap)
    stats["rollout/is_weight_mean"] = masked_mean(weights, mask)
    stats["rollout/is_capped_frac"] = masked_mean((weights >= rollout_is_cap).float(), mask)
    return stats, replace(exp, advantages=exp.advantages * weights)


def without_truncated(exp: Experience) -> Experience:
    """--mask-truncated: the responses that reached --response-length without EOS left out of
    the loss (DAPO's overlong filtering); the forward ignores the mask, the loss reads it."""
    kept = exp.seqs.response_mask * exp.ended[:, None].to(exp.seqs.response_mask.dtype)
    return replace(exp, seqs=replace(exp.seqs, response_mask=kept))


def finish_iteration(parts: "OnlineParts", exp: Experience, stats: dict, issues: list,
                     clock: PhaseClock, texts: list[str]) -> IterationResult:
    """Steps 6-7 of every method: the iteration's metrics (over every process's rollouts), KL
    control and the health checks (a non-finite loss or gradient already stopped the run before
    its optimizer step, in `update.minibatch_step`)."""
    beta, all_reduce = parts.kl_ctl.value, parts.all_reduce_sum()
    mask = exp.mask
    # 6. KL control: adaptive beta follows this batch's mean KL per sequence. The statistics
    #    are those of all processes' rollouts together, so every process logs, controls and
    #    checks the same values.
    world, wide = parts.accelerator.num_processes, None
    if all_reduce is not None:  # the spread, distinct-2 and EV of the gathered batch: the same
        gather = parts.accelerator.gather  # on every process
        wide = batch_wide_metrics(gather(exp.seqs.response_ids), gather(mask), gather(exp.rm_scores),
                                  *([gather(exp.values), gather(exp.returns)] if exp.values is not None else []))
    stats = {**experience_metrics(exp, beta, wide), **stats}
    if all_reduce is not None:  # token means: each process's weighted by its share of all tokens
        share = mask.sum() * world / all_reduce(mask.sum().float())
        for key in ("objective/kl_per_token", "objective/entropy"):
            stats[key] = stats[key] * share
    metrics = parts.mean_over_processes(stats)
    parts.kl_ctl.update(metrics["objective/kl"], n_steps=exp.kl.shape[0] * world)
    # 7. health: the reference probe is unchanged, and the trends are sane
    issues = issues + [parts.probe.check(parts.reference)] + parts.health.observe(metrics)
    issues = [i for i in issues if i is not None]
    if world > 1 and any_process(parts.accelerator, bool(issues)) and not issues:
        # a check on this process's own rollouts fired elsewhere: act on it here too, so that
        # an abort stops every process together
        issues = [HealthIssue("other_process", "another process reported a health issue at this "
                              "iteration; its log names it")]
    metrics["health/issues"] = float(len(issues))
    metrics.update(clock.metrics())
    # memory: the largest process's resident set, and the bytes of weights, gradients and
    # optimizer states it holds (its shards under --fsdp); one collective for both
    metrics["memory/rss_mb"], metrics["memory/state_mb"] = max_across_processes(
        parts.accelerator, resident_mb(), parts.state_bytes() / 2**20)
    return IterationResult(metrics, exp, texts, issues)
