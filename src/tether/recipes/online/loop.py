"""The online loop: `tether ppo`, `grpo`, `rloo` and `online-dpo` all run `run(cfg)`.

`run(cfg)` is the whole stage: build the components (setup.py), run iterations, log,
checkpoint, save. `run_iteration(parts, step)` is one iteration, SPEC's steps in order, with the
method's own steps taken from its `Algorithm` (algorithm.py) and the shared ones from steps.py;
a benchmark can build the parts once and time iterations directly. docs/ppo.md counts the
forward passes one iteration costs; docs/metrics.md explains every logged name.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tether.config import OnlineConfig, to_dict
from tether.errors import Interrupted
from tether.recipes.online.outputs import evaluate, gold_score, load_judge, sample_rows, save_final
from tether.recipes.online.setup import OnlineParts, build, stage_name
from tether.recipes.online.steps import (IterationResult, PhaseClock, finish_iteration, old_policy,
                                         sample_and_score, sampler_correction, without_truncated)
from tether.recipes.online.update import update
from tether.rollout.health import enforce
from tether.training.checkpoint import load_checkpoint, save_checkpoint
from tether.training.collectives import any_process
from tether.training.metrics import MetricsWriter
from tether.training.optim import apply_peak_lr, configured_peaks
from tether.training.progress import Progress
from tether.training.run import start_run
from tether.training.signals import StopRequest

log = logging.getLogger("tether")

__all__ = ["run", "run_iteration", "build", "OnlineParts", "IterationResult"]


def run_iteration(parts: OnlineParts, step: int) -> IterationResult:
    """One iteration on the prompts of iteration `step` (1-based)."""
    cfg, algorithm, clock = parts.cfg, parts.algorithm, PhaseClock(parts.device)
    # 1-2. rollouts (the method's number per prompt, the copies next to each other), reference
    #      logprobs, rewards; the method's shaping of the scored batch
    sampled = sample_and_score(parts, step, clock, repeat=algorithm.responses_per_prompt())
    shaped = algorithm.shape(parts, step, clock, sampled)
    sampled = shaped.sampled
    # 2b. pi_old (and V_old)
    old = old_policy(parts, sampled.seqs, clock)
    # 3-4. the method's training batch: rewards and advantages, or preferences
    prepared = algorithm.experience(parts, shaped, old)
    exp = prepared.experience
    mismatch, train = sampler_correction(cfg.rollout_is_cap, sampled.rollout, exp)
    if cfg.mask_truncated:
        train = without_truncated(train)
    clock.lap("score")
    # 5. update: --ppo-epochs passes of the method's loss over minibatches
    update_stats = update(parts, train, step, old.first)
    clock.lap("update")
    parts.generator.sync_weights()
    clock.lap("weight_sync")
    stats = {"objective/entropy": old.entropy, **sampled.stats, **shaped.stats, **prepared.stats,
             "response/noncanonical_frac": sampled.scored.noncanonical.float().mean(),
             **sampled.scored.metrics, **mismatch, **update_stats}
    # 6-7. metrics, KL control, health
    return finish_iteration(parts, exp, stats, prepared.issues, clock, sampled.texts)


def trainer_state(parts: OnlineParts, step: int) -> dict:
    """What resume needs beyond weights, optimizers and RNG (which accelerate saves)."""
    return {"kl_ctl": parts.kl_ctl.state_dict(), "health": parts.health.state_dict(),
            "prompt_position": step * parts.order.global_batch,
            "prompt_epoch": parts.order.epoch_of(step)}


def resume(parts: OnlineParts, out: Path) -> int:
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
    """Train the policy with the config's method and save it into cfg.output_dir; returns the
    summary."""
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
    metrics = MetricsWriter(out, is_main, cfg.report_to, resume_step=resumed,
                            config={"stage": type(cfg).__name__, **to_dict(cfg)}, stage=stage_name(cfg))
    samples = MetricsWriter(out, is_main, None, resume_step=resumed, filename="samples.jsonl")
    bar = Progress(cfg.max_steps, start, stage_name(cfg), cfg.progress and is_main)
    judge = load_judge(cfg.gold_judge)
    t0, row, failed = time.perf_counter(), {}, True
    failing: dict[str, int] = {}  # health checks failing now, and since when (rollout.health.enforce)
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
                enforce(result.issues, cfg.health, step, failing)  # abort: stop before saving this state
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
        failed = False
    finally:
        bar.close()
        metrics.close(failed=failed)
        if parts.episodes is not None:
            parts.episodes.close()
        # last: a vLLM engine takes the process group it joined down with it
        parts.generator.close()
    log.info("%s done: %s -> %s", stage_name(cfg), summary, out)
    return summary
