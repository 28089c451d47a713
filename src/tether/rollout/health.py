"""Health checks for PPO: the pitfalls the sources warn about, checked every iteration.

Two kinds:
- exact checks on this iteration's tensors (`check_*` functions): the reference is unchanged
  on a fixed probe batch, the per-token rewards are laid out as SPEC says, the batch KL is not
  negative;
- trend checks on the logged metrics (`HealthMonitor`): clipfrac or explained variance bad for
  several iterations in a row, or response length, entropy or distinct-2 collapsed relative to
  the first iteration.
Each returns `HealthIssue`s; `enforce` logs them, or raises under `--health abort`. The cost is
one small reference forward (the probe) and a few reductions per iteration.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from tether.errors import TrainingError
from tether.ops.masking import last_token_index
from tether.rollout.types import Sequences

log = logging.getLogger("tether")


@dataclass(frozen=True)
class HealthIssue:
    check: str  # a fixed name, e.g. "reference_changed"
    message: str  # what is wrong and what usually causes it


# ----------------------------------------------------------------------------- exact checks


class ReferenceProbe:
    """pi_ref's logprobs on a fixed probe batch, recorded once; later ones must be bit-identical.

    A change means the reference shares parameters with the policy, was left trainable, or its
    dropout is on. `torch.equal`, not allclose: the same inputs through the same frozen weights
    give the same bits on the same device.
    """

    def __init__(self, seqs: Sequences, temperature: float):
        self.seqs = seqs
        self.temperature = temperature
        self.baseline: Optional[Tensor] = None

    def check(self, reference: Any) -> Optional[HealthIssue]:
        """reference: anything with `.logprobs(seqs, temperature)` (rollout.score.Reference)."""
        current = reference.logprobs(self.seqs, self.temperature)
        if self.baseline is None:
            self.baseline = current
            return None
        if torch.equal(current, self.baseline):
            return None
        diff = (current - self.baseline).abs().max().item()
        return HealthIssue("reference_changed", (
            f"the reference's logprobs on the probe batch changed (max |diff| {diff:.3g}). pi_ref "
            "must stay frozen: it shares parameters with the policy, has requires_grad on, or "
            "runs with dropout."))


def check_reference_detached(reference: Any, trainable: list[torch.nn.Parameter]) -> Optional[HealthIssue]:
    """No parameter that an optimizer updates may be one the reference reads: the structural
    form of the probe above, which holds whatever the CPU's rounding. reference: a
    `rollout.score.Reference`; with LoRA (adapters off) it reads the base weights only."""
    from tether.training.fsdp import local

    # a sharded (--fsdp) parameter's own data_ptr is 0: compare the storage of its local shard
    updated = {local(p).data_ptr() for p in trainable if p.requires_grad}
    shared = [name for name, p in reference.read_parameters() if local(p).data_ptr() in updated]
    if not shared:
        return None
    return HealthIssue("reference_changed", (
        f"the reference reads {len(shared)} parameter(s) that the optimizer updates (e.g. "
        f"{shared[0]}): pi_ref must be a frozen copy of the SFT policy, not the policy itself."))


def check_reward_layout(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor,
                        mask: Tensor, kl_coef: float, rtol: float = 1e-4) -> Optional[HealthIssue]:
    """The per-token rewards must be -kl_coef * (logprobs - ref_logprobs) on every response token,
    plus the score on the last response token only (SPEC stage 3, step 3).

    Recomputes that from the inputs and names the usual mistake when it does not match: an RM
    score broadcast to every token, or a KL term with the wrong sign.
    All tensors (B, T) except scores (B,). Returns None when the layout is right.
    """
    real = mask.bool()
    kl_term = torch.where(real, -kl_coef * (logprobs - ref_logprobs), torch.zeros_like(rewards))
    residual = torch.where(real, rewards - kl_term, torch.zeros_like(rewards))
    last = torch.zeros_like(real).scatter(-1, last_token_index(real).unsqueeze(-1), True) & real
    off_last = real & ~last
    tol = rtol * (1.0 + scores.abs().max().item() + kl_term.abs().max().item())
    if off_last.any() and residual[off_last].abs().max().item() > tol:
        broadcast = scores.unsqueeze(-1).expand_as(rewards)
        if (residual - broadcast)[off_last].abs().max().item() <= tol:
            return HealthIssue("reward_layout", "the RM score appears on every response token; it "
                               "must be added at the last response token only.")
        if (residual + 2 * kl_term)[off_last].abs().max().item() <= tol:
            return HealthIssue("reward_layout", "the KL term of the per-token reward has the wrong "
                               "sign: it must be -beta * (log pi - log pi_ref).")
        return HealthIssue("reward_layout", "per-token rewards on non-final tokens are not "
                           "-beta * (log pi - log pi_ref).")
    has_last = real.any(-1)
    at_last = residual.gather(-1, last_token_index(real).unsqueeze(-1)).squeeze(-1)
    if has_last.any() and (at_last - scores)[has_last].abs().max().item() > tol:
        return HealthIssue("reward_layout", "the reward at the last response token is not the "
                           "KL term plus the RM score.")
    return None


def check_kl_not_negative(kl_per_sequence: Tensor, atol: float = 1e-3) -> Optional[HealthIssue]:
    """The batch mean of the per-sequence k1 KL must not be negative beyond sampling noise.

    k1 is unbiased, so its batch mean is below 0 only by chance; "by chance" is measured with the
    batch's own standard error (2 sigma) plus `atol`. kl_per_sequence: (B,).
    """
    mean = kl_per_sequence.mean().item()
    n = kl_per_sequence.numel()
    stderr = kl_per_sequence.std().item() / math.sqrt(n) if n > 1 else 0.0
    if mean < -(atol + 2 * stderr):
        return HealthIssue("negative_kl", (
            f"the batch KL to the reference is negative ({mean:.4g} nats per sequence, stderr "
            f"{stderr:.2g}). The logprobs of the policy and the reference were computed "
            "differently (temperature, dropout, padding, positions), or the reference drifted."))
    return None


# ----------------------------------------------------------------------------- trend checks


@dataclass(frozen=True)
class HealthThresholds:
    clipfrac_max: float = 0.3  # sustained above this: steps too large
    clipfrac_patience: int = 3  # iterations in a row
    explained_var_min: float = 0.0  # sustained below this: the critic is not learning
    explained_var_patience: int = 5
    warmup: int = 5  # iterations before the explained-variance check starts
    collapse_length: float = 0.25  # response length below this fraction of the first iteration's
    collapse_entropy: float = 0.25  # entropy below this fraction of the first iteration's
    collapse_distinct: float = 0.5  # distinct-2 below this fraction of the first iteration's
    # reward hacking: the per-token KL is at least kl_explosion_per_token and at least
    # kl_explosion_growth times what it was kl_explosion_window iterations ago, while the RM
    # score rose over the same iterations
    kl_explosion_per_token: float = 0.5
    kl_explosion_growth: float = 2.0
    kl_explosion_window: int = 5
    # non-canonical token sequences (ids that their own decoded text does not encode back to):
    # the fraction is above noncanonical_max and at least noncanonical_growth above the first
    # iteration's
    noncanonical_max: float = 0.1
    noncanonical_growth: float = 0.05
    # an engine with its own weights (vLLM): KL(sampler || trainer) per token above
    # mismatch_kl_max and at least mismatch_growth times the first iteration's
    mismatch_kl_max: float = 0.01
    mismatch_growth: float = 2.0
    # critic-free methods: most groups without reward variance, several iterations in a row
    zero_std_max: float = 0.8
    zero_std_patience: int = 3


@dataclass
class HealthMonitor:
    """Tracks the trend checks across iterations. Its state is saved in checkpoints."""

    thresholds: HealthThresholds = field(default_factory=HealthThresholds)
    first: dict = field(default_factory=dict)  # the first iteration's length/entropy/distinct
    streaks: dict = field(default_factory=dict)  # check name -> iterations in a row it failed
    iterations: int = 0
    recent: list = field(default_factory=list)  # [kl_per_token, rm_score] of the last iterations

    def observe(self, metrics: dict[str, float]) -> list[HealthIssue]:
        """metrics: this iteration's logged values (policy/clipfrac of the clipped-ratio methods,
        val/explained_var with a critic, response/length, objective/entropy, response/distinct_2,
        objective/kl_per_token, objective/rm_score)."""
        th, issues = self.thresholds, []
        self.iterations += 1
        clipped = metrics.get("policy/clipfrac", 0.0) > th.clipfrac_max  # the clipped-ratio methods
        if self._sustained("high_clipfrac", clipped, th.clipfrac_patience):
            issues.append(HealthIssue("high_clipfrac", (
                f"policy/clipfrac has been above {th.clipfrac_max} for {th.clipfrac_patience} "
                "iterations: the steps are too large. Lower --lr, or use more or smaller minibatches.")))
        ev_bad = (self.iterations > th.warmup and "val/explained_var" in metrics
                  and metrics["val/explained_var"] < th.explained_var_min)
        if self._sustained("negative_explained_var", ev_bad, th.explained_var_patience):
            issues.append(HealthIssue("negative_explained_var", (
                f"val/explained_var has been below {th.explained_var_min} for "
                f"{th.explained_var_patience} iterations: the critic is not learning. Check "
                "--value-lr and --vf-coef.")))
        issues += self._collapse(metrics)
        issues += self._kl_explosion(metrics)
        issues += self._noncanonical(metrics)
        issues += self._mismatch(metrics)
        # groups where every response got the same reward, or (online DPO) pairs left unlabelled
        flat = max(metrics.get("objective/frac_reward_zero_std", 0.0),
                   1.0 - metrics.get("dpo/labelled_frac", 1.0)) > th.zero_std_max
        if self._sustained("no_learning_signal", flat, th.zero_std_patience):
            issues.append(HealthIssue("no_learning_signal", (
                f"in more than {th.zero_std_max:.0%} of the groups (or pairs) every response got "
                f"the same reward, for {th.zero_std_patience} iterations: those groups have no "
                "advantage (those pairs no label) and teach nothing. The task is too hard or too "
                "easy for the policy, or the reward too coarse: raise --num-generations or "
                "--temperature, filter the prompts, or use a reward with partial credit.")))
        return issues

    def _against_first(self, key: str, metrics: dict[str, float]) -> Optional[tuple[float, float]]:
        """(this iteration's value, the first iteration's) of a metric that is logged only by
        some runs; None when this run does not log it."""
        if key not in metrics:
            return None
        now = float(metrics[key])
        return now, self.first.setdefault(key, now)

    def _noncanonical(self, metrics: dict[str, float]) -> list[HealthIssue]:
        th, values = self.thresholds, self._against_first("response/noncanonical_frac", metrics)
        if values is None:
            return []
        now, start = values
        if now > th.noncanonical_max and now >= start + th.noncanonical_growth:
            return [HealthIssue("noncanonical_tokens", (
                f"{now:.0%} of the responses are token sequences that their own text does not "
                f"encode back to (first iteration: {start:.0%}): the policy is learning ids that "
                "no text gives, such as half of a UTF-8 character. The reward model scores their "
                "re-encoded text, so this buys no reward; the sampled ids still drift from what "
                "the tokenizer produces. Raise --kl-coef or lower --lr."))]
        return []

    def _mismatch(self, metrics: dict[str, float]) -> list[HealthIssue]:
        th, values = self.thresholds, self._against_first("rollout/mismatch_kl", metrics)
        if values is None:
            return []
        now, start = values
        if now > th.mismatch_kl_max and now >= th.mismatch_growth * start:
            return [HealthIssue("sampler_mismatch", (
                f"the rollout engine's token logprobs drift from the trainer's: KL(sampler || "
                f"trainer) is {now:.3g} nats per token (first iteration: {start:.3g}). The samples "
                "are then off-policy by more than float error: the engine runs another precision "
                "or kernels that diverge as the weights move, or a weight sync is incomplete. "
                "Correct for it with --rollout-is-cap 2, or run the engine in the trainer's dtype."))]
        return []

    def _sustained(self, name: str, failing: bool, patience: int) -> bool:
        self.streaks[name] = self.streaks.get(name, 0) + 1 if failing else 0
        return self.streaks[name] >= patience

    def _collapse(self, metrics: dict[str, float]) -> list[HealthIssue]:
        th = self.thresholds
        watched = {"response/length": th.collapse_length, "objective/entropy": th.collapse_entropy,
                   "response/distinct_2": th.collapse_distinct}
        if not all(k in self.first for k in watched):
            self.first.update({k: float(metrics[k]) for k in watched})
            return []
        issues = []
        for key, fraction in watched.items():
            start, now = self.first[key], float(metrics[key])
            if start > 0 and now < fraction * start:
                issues.append(HealthIssue("collapse", (
                    f"{key} fell to {now:.4g} from {start:.4g} at the first iteration (below "
                    f"{fraction:.0%} of it): mode collapse or reward hacking. Raise --kl-coef or "
                    "lower --lr.")))
        return issues

    def _kl_explosion(self, metrics: dict[str, float]) -> list[HealthIssue]:
        th = self.thresholds
        self.recent.append([float(metrics["objective/kl_per_token"]), float(metrics["objective/rm_score"])])
        self.recent = self.recent[-(th.kl_explosion_window + 1):]
        if len(self.recent) <= th.kl_explosion_window:
            return []
        (kl_then, rm_then), (kl, rm) = self.recent[0], self.recent[-1]
        if kl >= th.kl_explosion_per_token and kl >= th.kl_explosion_growth * kl_then and rm > rm_then:
            return [HealthIssue("kl_explosion", (
                f"objective/kl_per_token rose from {kl_then:.3g} to {kl:.3g} nats over the last "
                f"{th.kl_explosion_window} iterations while objective/rm_score rose from "
                f"{rm_then:.3g} to {rm:.3g}: the policy is buying reward with distance from the "
                "reference (reward hacking). Raise --kl-coef, or set --kl-target."))]
        return []

    def state_dict(self) -> dict:
        return {"first": dict(self.first), "streaks": dict(self.streaks), "iterations": self.iterations,
                "recent": [list(r) for r in self.recent]}

    def load_state_dict(self, state: dict) -> None:
        self.first = dict(state.get("first", {}))
        self.streaks = dict(state.get("streaks", {}))
        self.iterations = int(state.get("iterations", 0))
        self.recent = [list(r) for r in state.get("recent", [])]


REPEAT_EVERY = 10  # a check that keeps failing is warned about again every this many iterations


def enforce(issues: list[HealthIssue], mode: str, step: int,
            failing: Optional[dict[str, int]] = None) -> None:
    """Log every issue as a warning; under mode "abort", then stop the run. failing (the run's
    state, check -> the iteration its current run of failures began): a check that fails
    iteration after iteration is warned about when it starts, then every REPEAT_EVERY
    iterations, and said to pass again when it does (health/issues counts every iteration)."""
    now = {issue.check for issue in issues}
    for issue in issues:
        since = failing.setdefault(issue.check, step) if failing is not None else step
        if since == step:
            log.warning("health check %s failed at iteration %d: %s", issue.check, step, issue.message)
        elif (step - since) % REPEAT_EVERY == 0:
            log.warning("health check %s still failing at iteration %d (since iteration %d): %s",
                        issue.check, step, since, issue.message)
    for check in [c for c in (failing or {}) if c not in now]:
        log.info("health check %s passes again at iteration %d (failed since iteration %d)",
                 check, step, failing.pop(check))
    if issues and mode == "abort":
        names = ", ".join(sorted({i.check for i in issues}))
        raise TrainingError(f"health check(s) {names} failed at iteration {step} (--health abort): "
                            f"{issues[0].message}")
