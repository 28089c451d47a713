"""The sampler-trainer mismatch and truncated importance sampling (ops/mismatch.py), on values
worked by hand, and the claim `loop.sampler_correction` rests on: a per-token weight on the
advantage is the same as that weight on the token's clipped policy term."""

import math

import pytest
import torch

from tether.losses.policy_gradient import clipped_policy_loss
from tether.ops.mismatch import mismatch_stats, truncated_is_weights

# two responses; the last token of the second is padding (its values must not count)
TRAINER = torch.tensor([[-1.0, -2.0], [-2.0, -0.3]])
SAMPLER = torch.tensor([[-1.5, -2.0], [-1.0, -9.0]])
MASK = torch.tensor([[1, 1], [1, 0]])


def test_mismatch_stats_by_hand():
    stats = mismatch_stats(TRAINER, SAMPLER, MASK)
    # d = trainer - sampler on the three real tokens: 0.5, 0, -1
    assert stats["rollout/mismatch_abs"].item() == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert stats["rollout/mismatch_max"].item() == pytest.approx(1.0)
    # k3 of KL(sampler || trainer) per token: (e^d - 1) - d
    k3 = [math.exp(0.5) - 1 - 0.5, 0.0, math.exp(-1) - 1 + 1]
    assert stats["rollout/mismatch_kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-6)


def test_identical_logprobs_have_no_mismatch():
    stats = mismatch_stats(TRAINER, TRAINER.clone(), MASK)
    assert all(v.item() == 0.0 for v in stats.values())


def test_truncated_is_weights_by_hand():
    w = truncated_is_weights(TRAINER, SAMPLER, MASK, cap=1.5)
    # exp(0.5) = 1.6487 is capped at 1.5; exp(0) = 1; exp(-1) = 0.3679 stays; padding is 1
    expected = torch.tensor([[1.5, 1.0], [math.exp(-1.0), 1.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert not w.requires_grad
    with pytest.raises(ValueError):
        truncated_is_weights(TRAINER, SAMPLER, MASK, cap=0.0)


def test_weighting_the_advantage_weights_the_clipped_term():
    torch.manual_seed(0)
    old = torch.randn(3, 5)
    new = (old + 0.3 * torch.randn(3, 5)).requires_grad_()
    advantages = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    w = torch.rand(3, 5) * 2
    loss, _ = clipped_policy_loss(new, old, advantages * w, mask, 0.2, aggregation="token_mean")
    ratio = torch.exp(new - old)
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    assert torch.allclose(loss, (w * per_token).mean(), atol=1e-6)
