"""The critic-free clipped loss (`tether.losses.policy_gradient`): aggregation modes,
clip-higher, GSPO's sequence ratio and the KL in the loss, against values worked out by hand."""

import math

import pytest
import torch

from tether.losses.policy_gradient import aggregate, clipped_policy_loss

MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("mode,expected", [
    ("token_mean", (1 + 2 + 3 + 4) / 4),  # every token weighs the same
    ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # each response weighs the same
    ("seq_mean_token_sum_norm", ((1 + 2 + 3) + 4) / 2 / 3),  # sums over a constant length (3)
])
def test_each_aggregation_mode(mode, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # 99: masked out
    assert aggregate(per_token, MASK, mode, max_tokens=3).item() == pytest.approx(expected)
    # the same through the loss: ratio 1 and A = -l make each token's loss l
    zeros = torch.zeros(2, 3)
    loss, _ = clipped_policy_loss(zeros, zeros, -per_token, MASK, aggregation=mode, max_tokens=3)
    assert loss.item() == pytest.approx(expected)


def test_clip_higher_lets_positive_advantages_move_further():
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(1.5))  # ratio 1.5
    adv, mask = torch.ones(1, 1), torch.ones(1, 1)
    plain, stats = clipped_policy_loss(new, old, adv, mask, eps_low=0.2)
    assert plain.item() == pytest.approx(-1.2)  # held at 1 + 0.2
    assert stats["policy/clip_ratio_high"].item() == 1.0 and stats["policy/clip_ratio_low"].item() == 0.0
    higher, _ = clipped_policy_loss(new, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert higher.item() == pytest.approx(-1.28)
    low_new = torch.full((1, 1), math.log(0.5))  # ratio 0.5 with A < 0: held at 1 - 0.2
    loss, stats = clipped_policy_loss(low_new, old, -adv, mask, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(0.8) and stats["policy/clip_ratio_low"].item() == 1.0


def test_gspo_uses_the_length_normalised_sequence_ratio():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.3, -0.1, 7.0]], requires_grad=True)  # token 3 is masked out
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.ones(1, 3)
    loss, _ = clipped_policy_loss(new, old, adv, mask, importance="sequence",
                                  aggregation="seq_mean_token_mean")
    s = math.exp((0.3 - 0.1) / 2)  # exp of the mean log-ratio over the 2 real tokens
    assert loss.item() == pytest.approx(-s)
    loss.backward()
    # d(-s)/d logprob_t = -s / |y| for each real token, 0 for the masked one
    assert new.grad.flatten().tolist() == pytest.approx([-s / 2, -s / 2, 0.0])
    token, _ = clipped_policy_loss(new.detach(), old, adv, mask, importance="token",
                                   aggregation="seq_mean_token_mean")
    assert token.item() == pytest.approx(-(min(math.exp(0.3), 1.2) + math.exp(-0.1)) / 2)


@pytest.mark.parametrize("estimator", ["k3", "k2"])
def test_the_kl_in_the_loss_is_beta_times_the_estimate(estimator):
    ref = torch.zeros(1, 2)
    logprobs = torch.tensor([[0.5, -0.25]])
    mask, adv = torch.ones(1, 2), torch.zeros(1, 2)  # no policy-gradient term: only the KL
    d = [-0.5, 0.25]  # log ref - log p
    per_token = [math.exp(x) - 1 - x for x in d] if estimator == "k3" else [0.5 * x * x for x in d]
    loss, stats = clipped_policy_loss(logprobs, logprobs.detach(), adv, mask, kl_coef=0.1,
                                      ref_logprobs=ref, kl_estimator=estimator)
    assert loss.item() == pytest.approx(0.1 * sum(per_token) / 2)
    assert stats["policy/kl_loss"].item() == pytest.approx(sum(per_token) / 2)
