"""The critic-free methods' advantage estimators and length shaping, against values worked out
by hand (`tether.ops.group_advantages`)."""

import math

import pytest
import torch

from tether.ops.group_advantages import (baseline_scores, overlong_penalty, reinforce_pp_advantages,
                                         sequence_advantages, token_returns, zero_std_groups)

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])  # two groups of G = 4


def test_grpo_divides_by_each_group_s_sample_std():
    std1 = math.sqrt((4 + 1 + 0 + 9) / 3)  # group 1: mean 3
    std2 = math.sqrt(4 * 0.25 / 3)  # group 2: mean 0.5
    expected = [-2 / std1, -1 / std1, 0, 3 / std1, -0.5 / std2, -0.5 / std2, 0.5 / std2, 0.5 / std2]
    got = sequence_advantages(SCORES, 4, "grpo", "group", eps=0.0)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_dr_grpo_only_centres():
    got = sequence_advantages(SCORES, 4, "dr_grpo", "group")
    assert got.tolist() == pytest.approx([-2, -1, 0, 3, -0.5, -0.5, 0.5, 0.5])


def test_rloo_subtracts_the_mean_of_the_other_responses():
    got = sequence_advantages(SCORES, 4, "rloo", "none")
    # 1 - (2 + 3 + 6) / 3 = -8/3, ..., 6 - (1 + 2 + 3) / 3 = 4
    assert got.tolist()[:4] == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    assert got.tolist()[4:] == pytest.approx([-2 / 3, -2 / 3, 2 / 3, 2 / 3])


def test_batch_scale_divides_the_group_centred_rewards_by_the_batch_std():
    mean = SCORES.mean().item()
    std = math.sqrt(sum((x - mean) ** 2 for x in SCORES.tolist()) / 7)
    got = sequence_advantages(SCORES, 4, "grpo", "batch", eps=0.0)
    assert got.tolist() == pytest.approx([x / std for x in [-2, -1, 0, 3, -0.5, -0.5, 0.5, 0.5]], rel=1e-6)


def test_a_group_whose_rewards_are_all_equal_has_zero_advantages_and_no_division():
    scores = torch.tensor([0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.0, 0.0])
    assert zero_std_groups(scores, 4).tolist() == [True, False]
    for estimator in ("grpo", "dr_grpo", "rloo"):
        for scale in ("group", "batch", "none"):
            got = sequence_advantages(scores, 4, estimator, scale, eps=0.0)  # eps 0: a 0/0 would be NaN
            assert torch.isfinite(got).all(), (estimator, scale)
            assert got[:4].tolist() == [0.0, 0.0, 0.0, 0.0], (estimator, scale)
            assert got[4] > 0, (estimator, scale)


def test_reinforce_pp_whitens_the_token_returns_over_the_batch():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert token_returns(rewards, mask).tolist() == [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]
    # the five returns 1, 1, 1, -1, -1: mean 0.2, unbiased variance (3 * 0.64 + 2 * 1.44) / 4 = 1.2
    got = reinforce_pp_advantages(rewards, mask)
    s = math.sqrt(1.2 + 1e-8)
    assert got.flatten().tolist() == pytest.approx([0.8 / s] * 3 + [-1.2 / s, -1.2 / s, 0.0], rel=1e-6)


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    assert baseline_scores(SCORES, 4).tolist() == pytest.approx([-2, -1, 0, 3, -0.5, -0.5, 0.5, 0.5])


def test_overlong_penalty_is_soft_inside_the_buffer():
    lengths = torch.tensor([5, 6, 8, 10])
    assert overlong_penalty(lengths, 10, 4, penalty=2.0).tolist() == [0.0, 0.0, -1.0, -2.0]
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0] * 4
