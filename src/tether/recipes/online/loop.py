"""`tether ppo`: PPO with a per-token KL penalty to the frozen SFT model (SPEC stage 3).

`run(cfg)` is the whole stage: build the components (recipes/online/setup.py), run iterations,
log, checkpoint, save. `run_iteration(parts, step)` is one iteration, SPEC's steps in order; a
benchmark can build the parts once and time iterations directly. docs/ppo.md counts the
forward passes one iteration costs; docs/metrics.md explains every logged name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from tether.config import OnlineConfig
from tether.errors import Interrupted
from tether.ops.advantages import gae
from tether.ops.masking import masked_mean, masked_whiten
from tether.ops.mismatch import mismatch_stats, truncated_is_weights
from tether.recipes.online.outputs import evaluate, gold_score, load_judge, sample_rows, save_final
from tether.recipes.online.setup import PPOParts, build, stage_name
from tether.recipes.online.update import forward_policy, mean_entropy, ppo_update, score_old_policy
from tether.rollout.health import HealthIssue, check_kl_not_negative, check_reward_layout, enforce
from tether.rollout.reward_fns import trl_trainer_state
from tether.rollout.stats import batch_wide_metrics, experience_metrics
from tether.rollout.types import Experience
from tether.training.checkpoint import load_checkpoint, save_checkpoint
from tether.training.metrics import MetricsWriter
from tether.training.progress import Progress
from tether.training.runtime import (any_process, apply_peak_lr, configured_peaks, max_across_processes,
                                     resident_mb, start_run)
from tether.training.signals import StopRequest

log = logging.getLogger("tether")

__all__ = ["run", "run_iteration", "build", "PPOParts", "IterationResult"]


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


def sampling_rng(cfg: OnlineConfig, step: int, device: torch.device) -> torch.Generator:
    """The sampling noise of iteration `step`: a function of the seed and the step only."""
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)


@dataclass
class Sampled:
    """One iteration's rollouts, scored: what every method starts its update from."""

    rows: list[int]  # prompt index of each rollout (a prompt repeated G times for groups)
    texts: list[str]  # the prompts' texts, per rollout
    rollout: Any  # rollout.types.Rollout
    seqs: Any  # rollout.types.Sequences
    ref_logprobs: torch.Tensor  # (B, T)
    scored: Any  # rollout.score.RewardScores


# Extra sampling rounds (dynamic sampling) draw the prompts and noise of "steps" this far apart,
# beyond any run's own: a function of the seed, the step and the round alone.
ROUND_STRIDE = 1_000_000


def sample_and_score(parts: PPOParts, step: int, clock: PhaseClock, repeat: int = 1,
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
    rollout = parts.generator.generate(prompt_ids, prompt_mask, sampling_rng(cfg, step, parts.device))
    seqs = rollout.sequences()
    clock.lap("rollout")
    ref_logprobs = parts.reference.logprobs(seqs, cfg.temperature)
    scored = parts.reward.score(seqs, texts, parts.prompts.chats_at(rows), parts.prompts.columns_at(rows),
                                parts.prompts.rows_at(rows), trl_trainer_state(iteration, cfg.max_steps))
    return Sampled(rows, texts, rollout, seqs, ref_logprobs, scored)


def run_iteration(parts: PPOParts, step: int) -> IterationResult:
    """One iteration on the prompts of iteration `step` (1-based): rollout, score, rewards,
    advantages, update, KL control, health checks. PPO here; the critic-free methods in
    `recipes/online/critic_free.py`."""
    if parts.cfg.critic == "none":
        from tether.recipes.online.critic_free import run_critic_free_iteration

        return run_critic_free_iteration(parts, step)
    cfg, clock = parts.cfg, PhaseClock(parts.device)
    # 1-2. rollout, reference logprobs, RM scores; the missing-EOS penalty
    sampled = sample_and_score(parts, step, clock)
    rollout, seqs, texts, ref_logprobs = sampled.rollout, sampled.seqs, sampled.texts, sampled.ref_logprobs
    mask, scored = rollout.response_mask, sampled.scored
    rm_scores, noncanonical = scored.scores, scored.noncanonical
    scores = rm_scores if cfg.missing_eos_penalty is None else torch.where(
        rollout.ended, rm_scores, torch.full_like(rm_scores, cfg.missing_eos_penalty))
    # 2b. pi_old and V_old. With one minibatch, the first update epoch's forward gives them
    #     (ratio exactly 1) and its graph is reused; otherwise a no-grad pass scores the batch.
    first = None
    if cfg.reuses_first_forward:
        clock.lap("score")
        first = forward_policy(parts, seqs, entropy=True)
        clock.lap("update")
        logprobs, values = first.logprobs.detach(), first.values.detach()
        entropy = mean_entropy(first, mask)
    else:
        logprobs, values, entropy = score_old_policy(parts, seqs, chunk=cfg.micro_batch_size)
    # 3. per-token rewards: -beta * k1 on every response token, the score at the last one
    beta, all_reduce = parts.kl_ctl.value, parts.all_reduce_sum()
    rewards, kl = parts.reward_fn(logprobs, ref_logprobs, scores, mask, beta)
    issues = [check_reward_layout(rewards, logprobs, ref_logprobs, scores, mask, beta),
              check_kl_not_negative(kl.sum(-1))]
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    # 4. advantages: GAE over response tokens, whitened over the global batch; returns = A + V
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    exp = Experience(seqs, logprobs, ref_logprobs, values, rm_scores, scores, rollout.ended, kl,
                     rewards, masked_whiten(advantages, mask, all_reduce=all_reduce), returns)
    mismatch, train = sampler_correction(cfg, rollout, exp)
    clock.lap("score")
    # 5. update: ppo_epochs passes of clipped policy + value (+ ptx) losses over minibatches
    update_stats = ppo_update(parts, train, step, first)
    clock.lap("update")
    parts.generator.sync_weights()
    clock.lap("weight_sync")
    stats = {"objective/entropy": entropy, "response/noncanonical_frac": noncanonical.float().mean(),
             **scored.metrics, **mismatch, **update_stats}
    return finish_iteration(parts, step, exp, stats, issues, clock, texts)


def sampler_correction(cfg: OnlineConfig, rollout: Any, exp: Experience) -> tuple[dict, Experience]:
    """When an engine with its own weights sampled the rollouts (vLLM): the sampler-trainer
    mismatch metrics, and with --rollout-is-cap the experience to train on, whose advantages
    carry the truncated importance weights (`ops/mismatch.py`). A weight w >= 0 per token
    scales that token's clipped policy term exactly as it scales its advantage, since
    w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r)); the value loss and the KL term
    are left as they are. Otherwise ({}, exp)."""
    if rollout.sampler_logprobs is None:
        return {}, exp
    mask = exp.mask
    stats = mismatch_stats(exp.logprobs, rollout.sampler_logprobs, mask)
    if cfg.rollout_is_cap is None:
        return stats, exp
    weights = truncated_is_weights(exp.logprobs, rollout.sampler_logprobs, mask, cfg.rollout_is_cap)
    stats["rollout/is_weight_mean"] = masked_mean(weights, mask)
    stats["rollout/is_capped_frac"] = masked_mean((weights >= cfg.rollout_is_cap).float(), mask)
    return stats, replace(exp, advantages=exp.advantages * weights)


def finish_iteration(parts: PPOParts, step: int, exp: Experience, stats: dict, issues: list,
                     clock: PhaseClock, texts: list[str], drop: tuple[str, ...] = ()) -> IterationResult:
    """Steps 6-7 of every method: the iteration's metrics (over every process's rollouts), KL
    control and the health checks (a non-finite loss or gradient already stopped the run before
    its optimizer step, in `update.minibatch_step`). `drop`: metrics that do not apply."""
    beta, all_reduce = parts.kl_ctl.value, parts.all_reduce_sum()
    mask = exp.mask
    # 6. KL control: adaptive beta follows this batch's mean KL per sequence. The statistics
    #    are those of all processes' rollouts together, so every process logs, controls and
    #    checks the same values.
    world, wide = parts.accelerator.num_processes, None
    if all_reduce is not None:  # the spread, distinct-2 and EV of the gathered batch: the same
        wide = batch_wide_metrics(*[parts.accelerator.gather(t) for t in (  # on every process
            exp.seqs.response_ids, mask, exp.values, exp.returns, exp.rm_scores)])
    stats = {**experience_metrics(exp, beta, wide), **stats}
    for key in drop:
        stats.pop(key, None)
    if all_reduce is not None:  # token means: each process's weighted by its share of all tokens
        share = mask.sum() * world / all_reduce(mask.sum().float())
        for key in ("objective/kl_per_token", "objective/entropy"):
            stats[key] = stats[key] * share
    metrics = parts.mean_over_processes(stats)
    parts.kl_ctl.update(metrics["objective/kl"], n_steps=exp.rewards.shape[0] * world)
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


def trainer_state(parts: PPOParts, step: int) -> dict:
    """What resume needs beyond weights, optimizers and RNG (which accelerate saves)."""
    return {"kl_ctl": parts.kl_ctl.state_dict(), "health": parts.health.state_dict(),
            "prompt_position": step * parts.order.global_batch,
            "prompt_epoch": parts.order.epoch_of(step)}


def resume(parts: PPOParts, out: Any) -> int:
    """Restore the latest readable checkpoint; returns its iteration (0 when there is none).
    The configured learning rates become the peaks from here on (see `apply_peak_lr`)."""
    peaks = configured_peaks(parts.optimizers)  # as built from the config, before the state loads
    loaded = load_checkpoint(parts.accelerator, out, parts.schedulers, parts.shards())
    if loaded is None:
        return 0
    ckpt, state = loaded
    apply_peak_lr(parts.schedulers, parts.optimizers, peaks)
    parts.kl_ctl.load_state_dict(state["kl_ctl"])
    parts.health.load_state_dict(state["health"])
    log.info("resumed from %s at iteration %d (prompt %d)", ckpt, state["step"], state["prompt_position"])
    return int(state["step"])


def run(cfg: OnlineConfig) -> dict:
    """Train the policy with PPO and save it into cfg.output_dir; returns the summary."""
    # 1. runtime, run directory and components (a vLLM engine the model cannot run is refused
    #    before the run directory is claimed)
    if cfg.generation_backend == "vllm":
        from tether.rollout.vllm_engine import preflight

        preflight(cfg.policy, cfg.dtype, cfg.trust_remote_code)
    accelerator, out = start_run(cfg)
    parts = build(cfg, accelerator)
    # 2. resume: weights, optimizers, RNG, beta, health trends; the data position is the step
    start = resume(parts, out) if cfg.resume else 0
    is_main = accelerator.is_main_process
    resumed = start if cfg.resume and start else None
    metrics = MetricsWriter(out, is_main, cfg.tensorboard, resume_step=resumed)
    samples = MetricsWriter(out, is_main, False, resume_step=resumed, filename="samples.jsonl")
    bar = Progress(cfg.max_steps, start, stage_name(cfg), cfg.progress and is_main)
    judge = load_judge(cfg.gold_judge)
    t0, row = time.perf_counter(), {}
    try:
        with StopRequest() as stop:
            # 3. the loop: one iteration = rollout, score, update (see run_iteration)
            for step in range(start + 1, cfg.max_steps + 1):
                result = run_iteration(parts, step)
                row = result.metrics
                if judge is not None:
                    row["objective/gold_score"] = gold_score(parts, result, judge)
                if parts.eval_prompts is not None and (
                        step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    row.update(evaluate(parts))
                metrics.log(step, row)
                for sample in sample_rows(parts, result, cfg.samples_per_iteration):
                    samples.log(step, sample)
                bar.update(1, reward=row["objective/rm_score"], kl=row["objective/kl"])
                enforce(result.issues, cfg.health, step)  # abort: stop before saving this state
                interrupted = any_process(accelerator, stop.requested)
                # 4. atomic checkpoints
                if step % cfg.save_every == 0 or step == cfg.max_steps or interrupted:
                    save_checkpoint(accelerator, out, step, trainer_state(parts, step), cfg.keep_checkpoints,
                                    parts.schedulers, [accelerator.unwrap_model(m) for _, m, _ in parts.trainables()],
                                    parts.shards())
                if interrupted:
                    raise Interrupted(f"stopped at iteration {step}; checkpoint saved under "
                                      f"{out}/checkpoints. Rerun the same command with --resume to continue.")
        # 5. the output directory becomes the policy; the critic goes to output_dir/critic
        summary = {"steps": cfg.max_steps, "train_seconds": round(time.perf_counter() - t0, 2),
                   **{k: v for k, v in row.items() if k.startswith(("objective/", "eval/"))}}
        save_final(parts, out, summary)
    finally:
        bar.close()
        metrics.close()
        # last: a vLLM engine takes the process group it joined down with it
        parts.generator.close()
    log.info("%s done: %s -> %s", stage_name(cfg), summary, out)
    return summary
