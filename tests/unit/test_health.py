"""Every PPO health check, deliberately triggered on crafted inputs (and left quiet on good ones)."""

import logging

import pytest
import torch

from tether.errors import TrainingError
from tether.ops.advantages import kl_penalised_rewards
from tether.rollout.health import (HealthIssue, HealthMonitor, HealthThresholds, ReferenceProbe,
                                   check_reference_detached,
                                   check_kl_not_negative, check_reward_layout, enforce)
from tether.rollout.score import Reference
from tether.rollout.types import Rollout

BETA = 0.1


def _batch():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.5, -9.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -2.0], [-0.4, -1.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    return logprobs, ref_logprobs, scores, mask


def test_correct_rewards_pass_the_layout_check():
    logprobs, ref, scores, mask = _batch()
    rewards, _ = kl_penalised_rewards(logprobs, ref, scores, mask, BETA)
    assert check_reward_layout(rewards, logprobs, ref, scores, mask, BETA) is None


def test_a_score_broadcast_to_every_token_is_caught():
    logprobs, ref, scores, mask = _batch()
    kl = torch.where(mask.bool(), logprobs - ref, torch.zeros_like(ref))
    rewards = torch.where(mask.bool(), -BETA * kl + scores[:, None], torch.zeros_like(kl))
    issue = check_reward_layout(rewards, logprobs, ref, scores, mask, BETA)
    assert issue is not None and issue.check == "reward_layout" and "every response token" in issue.message


def test_a_flipped_kl_sign_is_caught():
    logprobs, ref, scores, mask = _batch()
    rewards, _ = kl_penalised_rewards(ref, logprobs, scores, mask, BETA)  # arguments swapped: +beta*k1
    issue = check_reward_layout(rewards, logprobs, ref, scores, mask, BETA)
    assert issue is not None and "wrong sign" in issue.message


def test_a_missing_or_misplaced_score_is_caught():
    logprobs, ref, scores, mask = _batch()
    rewards, _ = kl_penalised_rewards(logprobs, ref, torch.zeros(2), mask, BETA)
    assert "last response token" in check_reward_layout(rewards, logprobs, ref, scores, mask, BETA).message
    first = rewards.clone()
    first[:, 0] += scores  # paid at the first token instead of the last
    assert check_reward_layout(first, logprobs, ref, scores, mask, BETA) is not None


def test_negative_batch_kl_is_caught_but_noise_around_zero_is_not():
    assert check_kl_not_negative(torch.tensor([-0.5, -0.4, -0.6, -0.5])).check == "negative_kl"
    assert check_kl_not_negative(torch.tensor([0.3, -0.2, 0.1, -0.1])) is None
    assert check_kl_not_negative(torch.zeros(8)) is None  # policy == reference at the start


def test_reference_sharing_parameters_with_the_policy_is_caught(tiny_models):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    probe = ReferenceProbe(Rollout(ids, (ids > 0).long(), torch.tensor([[10, 11], [12, 13]]),
                                   torch.ones(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.bool)
                                   ).sequences(), temperature=0.7)
    shared = Reference(policy)  # the bug: the "reference" is the policy itself
    assert probe.check(shared) is None  # records the baseline
    assert probe.check(shared) is None  # same bits when nothing moved
    with torch.no_grad():  # one "optimizer step" on the policy: a change log-softmax must see
        # (a shift shared by every vocabulary row would cancel in it, whatever the rounding)
        policy.lm_head.weight.add_(0.01 * torch.randn(policy.lm_head.weight.shape,
                                                      generator=torch.Generator().manual_seed(0)))
    issue = probe.check(shared)
    assert issue is not None and issue.check == "reference_changed"
    # the structural check catches the sharing before any step, on any CPU
    issue = check_reference_detached(shared, list(policy.parameters()))
    assert issue is not None and issue.check == "reference_changed"
    copy = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    assert check_reference_detached(Reference(copy), list(policy.parameters())) is None


def test_sustained_high_clipfrac_and_negative_explained_variance():
    monitor = HealthMonitor(HealthThresholds(clipfrac_patience=3, explained_var_patience=2, warmup=2))
    good = {"response/length": 10.0, "objective/entropy": 2.0, "response/distinct_2": 0.9,
            "objective/kl_per_token": 0.05, "objective/rm_score": 0.5}
    names = []
    for clipfrac, ev in [(0.5, -1.0), (0.5, -1.0), (0.5, -1.0), (0.5, -1.0), (0.1, 0.5)]:
        issues = monitor.observe({**good, "policy/clipfrac": clipfrac, "val/explained_var": ev})
        names.append(sorted(i.check for i in issues))
    # clipfrac: fails from the 3rd high iteration; explained variance: only after the 2-iteration
    # warm-up, then after 2 bad iterations in a row (iterations 3 and 4)
    assert names == [[], [], ["high_clipfrac"], ["high_clipfrac", "negative_explained_var"], []]


@pytest.mark.parametrize("key", ["response/length", "objective/entropy", "response/distinct_2"])
def test_collapse_against_the_first_iteration(key):
    monitor = HealthMonitor()
    first = {"response/length": 20.0, "objective/entropy": 3.0, "response/distinct_2": 0.8,
             "policy/clipfrac": 0.1, "val/explained_var": 0.5, "objective/kl_per_token": 0.05,
             "objective/rm_score": 0.5}
    assert monitor.observe(first) == []
    assert monitor.observe({**first, key: first[key] * 0.9}) == []
    issues = monitor.observe({**first, key: first[key] * 0.1})
    assert [i.check for i in issues] == ["collapse"] and key in issues[0].message


def _trend(kl, rm):
    return {"response/length": 10.0, "objective/entropy": 2.0, "response/distinct_2": 0.9,
            "policy/clipfrac": 0.1, "val/explained_var": 0.5, "objective/kl_per_token": kl,
            "objective/rm_score": rm}


def test_reward_rising_while_kl_explodes_is_caught():
    """The per-token KL of the demo's beta = 0 run at seed 0 (iterations 4-10) with its RM score:
    caught at iteration 9, where the KL has reached 0.54 nats/token from 0.09 five iterations
    earlier while the score rose from 0.72 to 0.81."""
    kl = [0.00, 0.02, 0.06, 0.09, 0.13, 0.21, 0.26, 0.42, 0.54, 0.91]
    rm = [-0.02, 0.30, 0.53, 0.72, 0.74, 0.82, 0.86, 0.86, 0.81, 0.86]
    monitor = HealthMonitor()
    fired = [i + 1 for i, (k, r) in enumerate(zip(kl, rm)) if monitor.observe(_trend(k, r))]
    assert fired == [9, 10]
    assert "reward hacking" in monitor.observe(_trend(1.2, 0.9))[0].message


@pytest.mark.parametrize("kl, rm", [
    ([0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.35], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),  # KL stays small
    ([0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.9], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),  # large but not growing 2x
    ([0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.2], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]),  # the RM score fell
])
def test_kl_that_grows_slowly_or_without_reward_is_not_reward_hacking(kl, rm):
    monitor = HealthMonitor()
    assert all(monitor.observe(_trend(k, r)) == [] for k, r in zip(kl, rm))


def test_monitor_state_round_trips():
    a = HealthMonitor()
    a.observe({"response/length": 5.0, "objective/entropy": 1.0, "response/distinct_2": 0.5,
               "policy/clipfrac": 0.9, "val/explained_var": -1.0, "objective/kl_per_token": 0.3,
               "objective/rm_score": 0.2})
    b = HealthMonitor()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.recent == [[0.3, 0.2]]


def test_enforce_warns_or_aborts(caplog):
    issue = HealthIssue("negative_kl", "bad")
    with caplog.at_level(logging.WARNING, logger="tether"):
        logger = logging.getLogger("tether")
        logger.propagate, old = True, logger.propagate
        try:
            enforce([issue], "warn", 3)
        finally:
            logger.propagate = old
    assert "negative_kl" in caplog.text
    enforce([], "abort", 3)
    with pytest.raises(TrainingError, match="negative_kl.*iteration 3"):
        enforce([issue], "abort", 3)


def test_a_growing_share_of_non_canonical_responses_is_reported():
    monitor = HealthMonitor(HealthThresholds(noncanonical_max=0.1, noncanonical_growth=0.05))
    good = {"response/length": 10.0, "objective/entropy": 2.0, "response/distinct_2": 0.9,
            "objective/kl_per_token": 0.05, "objective/rm_score": 0.5, "policy/clipfrac": 0.1,
            "val/explained_var": 0.5}
    fired = [[i.check for i in monitor.observe({**good, "response/noncanonical_frac": f})]
             for f in (0.0, 0.04, 0.12, 0.5)]
    assert fired == [[], [], ["noncanonical_tokens"], ["noncanonical_tokens"]]
    steady = HealthMonitor(HealthThresholds(noncanonical_max=0.1, noncanonical_growth=0.05))
    # a tokenizer whose round trip is lossy from the start: reported only when it grows
    assert all(not steady.observe({**good, "response/noncanonical_frac": 0.3}) for _ in range(3))


def test_a_growing_sampler_trainer_mismatch_is_reported():
    good = {"response/length": 10.0, "objective/entropy": 2.0, "response/distinct_2": 0.9,
            "objective/kl_per_token": 0.05, "objective/rm_score": 0.5, "policy/clipfrac": 0.1,
            "val/explained_var": 0.5}
    monitor = HealthMonitor()
    fired = [[i.check for i in monitor.observe({**good, "rollout/mismatch_kl": kl})]
             for kl in (0.001, 0.005, 0.02, 0.0015)]
    assert fired == [[], [], ["sampler_mismatch"], []]
    # a mismatch that starts high and stays there (a bf16 engine, say) is not a growth
    steady = HealthMonitor()
    assert all(not steady.observe({**good, "rollout/mismatch_kl": 0.03}) for _ in range(3))
    # without an engine there is no such metric and nothing to check
    assert not HealthMonitor().observe(good)


def test_a_check_that_keeps_failing_is_warned_about_at_its_start_then_every_ten_iterations():
    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    issue = HealthIssue("collapse", "distinct-2 fell")
    failing: dict = {}
    logger, keep = logging.getLogger("tether"), Keep()
    logger.addHandler(keep)
    level, logger.level = logger.level, logging.INFO
    try:
        for step in range(3, 26):  # failing at iterations 3..25
            enforce([issue], "warn", step, failing)
        enforce([], "warn", 26, failing)
        enforce([issue], "warn", 27, failing)  # a new run of failures: warned at once
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    warned = [r.getMessage().split(":")[0] for r in keep.records if r.levelno == logging.WARNING]
    assert warned == ["health check collapse failed at iteration 3",
                      "health check collapse still failing at iteration 13 (since iteration 3)",
                      "health check collapse still failing at iteration 23 (since iteration 3)",
                      "health check collapse failed at iteration 27"]
    assert any("passes again at iteration 26" in r.getMessage() for r in keep.records)
    assert failing == {"collapse": 27}
