import pytest
import torch

from tether.losses.kto import kto_loss, kto_reference_point


def test_kto_reference_point_by_hand():
    policy = torch.tensor([-10.0, -20.0, -5.0])
    ref = torch.tensor([-12.0, -19.0, -8.0])
    # differences [2, -1, 3]: mean 4 / 3 = 1.333333 > 0
    z0 = kto_reference_point(policy, ref)
    assert z0.dim() == 0
    torch.testing.assert_close(z0, torch.tensor(1.333333))


def test_kto_reference_point_clamps_at_zero_and_carries_no_gradient():
    policy = torch.tensor([-10.0, -20.0], requires_grad=True)
    ref = torch.tensor([-9.0, -18.0])
    # differences [-1, -2]: mean -1.5 -> max(0, -1.5) = 0
    z0 = kto_reference_point(policy, ref)
    assert z0.item() == 0.0
    assert not z0.requires_grad
    z0 = kto_reference_point(policy, ref - 5.0)  # differences [4, 3], mean 3.5
    assert z0.item() == 3.5
    assert not z0.requires_grad and z0.grad_fn is None


def test_kto_loss_by_hand_with_gradient():
    policy = torch.tensor([-8.0, -13.0, -9.0], requires_grad=True)
    ref = torch.tensor([-10.0, -10.0, -10.0])
    desirable = torch.tensor([True, False, False])
    losses, stats = kto_loss(policy, ref, desirable, torch.tensor(0.5), beta=0.1)
    # r = [2, -3, 1], z0 = 0.5
    # row 0, desirable:   1 - sigmoid(0.1 * (2 - 0.5)) = 1 - sigmoid(0.15) = 1 - 0.537430 = 0.462570
    # row 1, undesirable: 1 - sigmoid(0.1 * (0.5 + 3)) = 1 - sigmoid(0.35) = 1 - 0.586618 = 0.413382
    # row 2, undesirable: 1 - sigmoid(0.1 * (0.5 - 1)) = 1 - sigmoid(-0.05) = 1 - 0.487503 = 0.512497
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.tensor([0.462570, 0.413382, 0.512497]))
    torch.testing.assert_close(stats["kto/z0"], torch.tensor(0.5))
    torch.testing.assert_close(stats["rewards/desirable"], torch.tensor(0.2))  # 0.1 * 2
    torch.testing.assert_close(stats["rewards/undesirable"], torch.tensor(-0.1))  # 0.1 * (-3 + 1) / 2
    torch.testing.assert_close(stats["kto/desirable_frac"], torch.tensor(1 / 3))
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    losses.sum().backward()
    # desirable: d/dr [1 - s(beta (r - z0))] = -beta s (1 - s) = -0.1 * 0.537430 * 0.462570 = -0.024860
    # undesirable: d/dr [1 - s(beta (z0 - r))] = +beta s (1 - s):
    #   row 1: 0.1 * 0.586618 * 0.413382 = 0.024250;  row 2: 0.1 * 0.487503 * 0.512497 = 0.024984
    torch.testing.assert_close(policy.grad, torch.tensor([-0.024860, 0.024250, 0.024984]))


def test_kto_loss_z0_gets_no_gradient():
    policy = torch.tensor([-8.0, -13.0], requires_grad=True)
    kl_policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    ref = torch.tensor([-10.0, -10.0])
    z0 = kto_reference_point(kl_policy, torch.tensor([-7.0, -7.0]))  # mean(2, 1) = 1.5
    assert z0.item() == 1.5
    losses, _ = kto_loss(policy, ref, torch.tensor([True, False]), z0)
    losses.sum().backward()
    assert policy.grad is not None
    assert kl_policy.grad is None


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_kto_loss_at_reference_is_half_the_weight(beta):
    x = torch.tensor([-3.0, -7.0, -2.0, -11.0])
    desirable = torch.tensor([True, False, True, False])
    losses, stats = kto_loss(x, x, desirable, torch.tensor(0.0), beta=beta,
                             desirable_weight=1.5, undesirable_weight=2.0)
    # r = 0, z0 = 0: 1 - sigmoid(0) = 0.5 times the weight: 0.75 desirable, 1.0 undesirable
    torch.testing.assert_close(losses, torch.tensor([0.75, 1.0, 0.75, 1.0]))
    torch.testing.assert_close(stats["kto/desirable_frac"], torch.tensor(0.5))


def test_kto_loss_stats_without_desirable_rows():
    policy = torch.tensor([-4.0, -6.0])
    ref = torch.tensor([-5.0, -5.0])
    losses, stats = kto_loss(policy, ref, torch.tensor([False, False]), torch.tensor(0.0), beta=0.5)
    # r = [1, -1]; undesirable: 1 - sigmoid(0.5 * (0 - r)) = sigmoid(0.5 r):
    #   sigmoid(0.5) = 0.622459, sigmoid(-0.5) = 0.377541
    torch.testing.assert_close(losses, torch.tensor([0.622459, 0.377541]))
    assert stats["rewards/desirable"].item() == 0.0
    torch.testing.assert_close(stats["rewards/undesirable"], torch.tensor(0.0))  # 0.5 * (1 - 1) / 2
    assert stats["kto/desirable_frac"].item() == 0.0
