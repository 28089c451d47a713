import math

import torch

from tether.losses.ppo import policy_loss, value_loss

E05 = math.exp(0.5)  # 1.648721


def test_policy_loss_ratio_clipped_to_1_2():
    # one token: log ratio 0.5 -> ratio e^0.5 = 1.648721; A = +1
    # unclipped -A*ratio = -1.648721, clipped -A*1.2 = -1.2; max = -1.2 -> loss -1.2, clipped
    logprobs = torch.tensor([[-0.5]], requires_grad=True)
    old = torch.tensor([[-1.0]])
    loss, stats = policy_loss(logprobs, old, torch.tensor([[1.0]]), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    assert stats["policy/clipfrac"].item() == 1.0
    loss.backward()
    assert logprobs.grad.item() == 0.0  # the clipped branch has no gradient


def test_policy_loss_mixed_tokens_and_mask():
    logprobs = torch.tensor([[-0.5, -0.5, 3.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, -9.0]])
    adv = torch.tensor([[1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])  # the huge third token is padding
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    # token 0: A=+1, clipped: -1.2
    # token 1: A=-1: unclipped 1.648721 vs clipped 1.2; max = 1.648721 (not clipped: the
    #          ratio moved the wrong way, so the full penalty applies)
    # loss = (-1.2 + 1.648721) / 2 = 0.224361
    torch.testing.assert_close(loss, torch.tensor(0.224361))
    assert stats["policy/clipfrac"].item() == 0.5
    # approx_kl = mean of 0.5 * 0.5^2 = 0.125; ratio mean = 1.648721
    torch.testing.assert_close(stats["policy/approx_kl"], torch.tensor(0.125))
    torch.testing.assert_close(stats["policy/ratio_mean"], torch.tensor(E05))
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # d/dlogp of -A * e^(logp - old) for token 1 = ratio = 1.648721, over 2 tokens = 0.824361
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.824361, 0.0]]))


def test_policy_loss_inside_clip_range_is_plain_ratio_times_advantage():
    # log ratio ln 1.1 -> ratio 1.1, inside [0.8, 1.2]; A = 2: loss = -2 * 1.1 = -2.2
    logprobs = torch.tensor([[math.log(1.1)]])
    loss, stats = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1))
    torch.testing.assert_close(loss, torch.tensor(-2.2))
    assert stats["policy/clipfrac"].item() == 0.0


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 1.0, 50.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # clipped V = 0.5 + clip(0.5, -0.2, 0.2) = 0.7 for both real tokens
    # token 0: R=0: (1-0)^2 = 1 vs (0.7-0)^2 = 0.49 -> 1 (unclipped)
    # token 1: R=2: (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # loss = 0.5 * (1 + 1.69) / 2 = 0.6725
    torch.testing.assert_close(loss, torch.tensor(0.6725))
    assert stats["val/clipfrac"].item() == 0.5
    torch.testing.assert_close(stats["val/mean"], torch.tensor(1.0))
    loss.backward()
    # grad only from token 0: d/dV 0.5 * (V - 0)^2 / 2 = V / 2 = 0.5
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, 0.0]]))
