"""`tether ppo`: PPO with a per-token KL penalty to the frozen SFT model (SPEC stage 3).

`run(cfg)` is the whole stage: build the components (recipes/online/setup.py), run iterations,
log, checkpoint, save. `run_iteration(parts, step)` is one iteration, SPEC's steps in order; a
benchmark can build the parts once and time iterations directly. docs/ppo.md counts the
forward passes one iteration costs; docs/metrics.md explains every logged name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from tether.config import PPOConfig
from tether.errors import Interrupted
from tether.ops.advantages import gae
from tether.ops.masking import masked_whiten
from tether.recipes.online.outputs import evaluate, gold_score, load_judge, sample_rows, save_final
from tether.recipes.online.setup import PPOParts, build
from tether.recipes.online.update import forward_policy, mean_entropy, ppo_update, score_old_policy
from tether.rollout.health import HealthIssue, check_kl_not_negative, check_reward_layout, enforce
from tether.rollout.stats import batch_wide_metrics, experience_metrics
from tether.rollout.types import Experience
from tether.training.checkpoint import load_checkpoint, save_checkpoint
from tether.training.metrics import MetricsWriter
from tether.training.progress import Progress
from tether.training.runtime import any_process, apply_peak_lr, check_finite, start_run
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


def sampling_rng(cfg: PPOConfig, step: int, device: torch.device) -> torch.Generator:
    """The sampling noise of iteration `step`: a function of the seed and the step only."""
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)


def run_iteration(parts: PPOParts, step: int) -> IterationResult:
    """One PPO iteration on the prompts of iteration `step` (1-based): rollout, score, rewards,
    advantages, update, KL control, health checks."""
    cfg, clock = parts.cfg, PhaseClock(parts.device)
    # 1. rollout: one response per prompt at temperature T, prompts left-padded
    indices = parts.order.step_indices(step - 1, parts.accelerator.process_index)[0]
    prompt_ids, prompt_mask, texts = parts.prompts.batch(indices, parts.tokenizer.pad_token_id, parts.device)
    rollout = parts.generator.generate(prompt_ids, prompt_mask, sampling_rng(cfg, step, parts.device))
    seqs, mask = rollout.sequences(), rollout.response_mask
    clock.lap("rollout")
    # 2. score: pi_ref logprobs (same T), calibrated RM scores, the missing-EOS penalty
    ref_logprobs = parts.reference.logprobs(seqs, cfg.temperature)
    scored = parts.reward.score(seqs, texts, parts.prompts.chats_at(indices),
                                parts.prompts.columns_at(indices), parts.prompts.rows_at(indices))
    rm_scores, noncanonical = scored.scores, scored.noncanonical
    scores = rm_scores if cfg.missing_eos_penalty is None else torch.where(
        rollout.ended, rm_scores, torch.full_like(rm_scores, cfg.missing_eos_penalty))
    # 2b. pi_old and V_old. With one minibatch, the first update epoch's forward gives them
    #     (ratio exactly 1) and its graph is reused; otherwise a no-grad pass scores the batch.
    first = None
    if cfg.reuses_first_forward:
        clock.lap("score")
        first = forward_policy(parts, seqs)
        clock.lap("update")
        logprobs, values = first.logprobs.detach(), first.values.detach()
        entropy = mean_entropy(first.logits, mask, cfg.temperature)
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
    clock.lap("score")
    # 5. update: ppo_epochs passes of clipped policy + value (+ ptx) losses over minibatches
    update_stats = ppo_update(parts, exp, step, first)
    parts.generator.sync_weights()
    clock.lap("update")
    # 6. KL control: adaptive beta follows this batch's mean KL per sequence. The statistics
    #    are those of all processes' rollouts together, so every process logs, controls and
    #    checks the same values.
    world, wide = parts.accelerator.num_processes, None
    if all_reduce is not None:  # the spread, distinct-2 and EV of the gathered batch: the same
        wide = batch_wide_metrics(*[parts.accelerator.gather(t) for t in (  # on every process
            seqs.response_ids, mask, exp.values, exp.returns, exp.rm_scores)])
    stats = {**experience_metrics(exp, beta, wide), "objective/entropy": entropy,
             "response/noncanonical_frac": noncanonical.float().mean(), **scored.metrics,
             **update_stats}
    if all_reduce is not None:  # token means: each process's weighted by its share of all tokens
        share = mask.sum() * world / all_reduce(mask.sum().float())
        for key in ("objective/kl_per_token", "objective/entropy"):
            stats[key] = stats[key] * share
    metrics = parts.mean_over_processes(stats)
    check_finite(torch.tensor(metrics["policy/loss"] + metrics["val/loss"]), step, "the PPO loss")
    parts.kl_ctl.update(metrics["objective/kl"], n_steps=exp.rewards.shape[0] * world)
    # 7. health: the reference probe is unchanged, and the trends are sane
    issues += [parts.probe.check(parts.reference)] + parts.health.observe(metrics)
    issues = [i for i in issues if i is not None]
    if world > 1 and any_process(parts.accelerator, bool(issues)) and not issues:
        # a check on this process's own rollouts fired elsewhere: act on it here too, so that
        # an abort stops every process together
        issues = [HealthIssue("other_process", "another process reported a health issue at this "
                              "iteration; its log names it")]
    metrics["health/issues"] = float(len(issues))
    metrics.update(clock.metrics())
    return IterationResult(metrics, exp, texts, issues)


def trainer_state(parts: PPOParts, step: int) -> dict:
    """What resume needs beyond weights, optimizers and RNG (which accelerate saves)."""
    return {"kl_ctl": parts.kl_ctl.state_dict(), "health": parts.health.state_dict(),
            "prompt_position": step * parts.order.global_batch,
            "prompt_epoch": parts.order.epoch_of(step)}


def resume(parts: PPOParts, out: Any) -> int:
    """Restore the latest readable checkpoint; returns its iteration (0 when there is none).
    The configured learning rates become the peaks from here on (see `apply_peak_lr`)."""
    loaded = load_checkpoint(parts.accelerator, out, parts.schedulers)
    if loaded is None:
        return 0
    ckpt, state = loaded
    cfg = parts.cfg
    peaks = [[cfg.lr] + ([cfg.value_lr] if parts.critic is None else [])]
    if parts.critic is not None:
        peaks.append([cfg.value_lr])
    apply_peak_lr(parts.schedulers, parts.optimizers, peaks)
    parts.kl_ctl.load_state_dict(state["kl_ctl"])
    parts.health.load_state_dict(state["health"])
    log.info("resumed from %s at iteration %d (prompt %d)", ckpt, state["step"], state["prompt_position"])
    return int(state["step"])


def run(cfg: PPOConfig) -> dict:
    """Train the policy with PPO and save it into cfg.output_dir; returns the summary."""
    # 1. runtime, run directory and components
    accelerator, out = start_run(cfg)
    parts = build(cfg, accelerator)
    # 2. resume: weights, optimizers, RNG, beta, health trends; the data position is the step
    start = resume(parts, out) if cfg.resume else 0
    is_main = accelerator.is_main_process
    resumed = start if cfg.resume and start else None
    metrics = MetricsWriter(out, is_main, cfg.tensorboard, resume_step=resumed)
    samples = MetricsWriter(out, is_main, False, resume_step=resumed, filename="samples.jsonl")
    bar = Progress(cfg.max_steps, start, "ppo", cfg.progress and is_main)
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
                                    parts.schedulers, [accelerator.unwrap_model(m) for _, m, _ in parts.trainables()])
                if interrupted:
                    raise Interrupted(f"stopped at iteration {step}; checkpoint saved under "
                                      f"{out}/checkpoints. Rerun the same command with --resume to continue.")
    finally:
        bar.close()
        metrics.close()
    # 5. the output directory becomes the policy; the critic goes to output_dir/critic
    summary = {"steps": cfg.max_steps, "train_seconds": round(time.perf_counter() - t0, 2),
               **{k: v for k, v in row.items() if k.startswith(("objective/", "eval/"))}}
    save_final(parts, out, summary)
    log.info("ppo done: %s -> %s", summary, out)
    return summary
