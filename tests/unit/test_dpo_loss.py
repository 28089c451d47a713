import torch

from tether.losses.dpo import dpo_loss


def test_dpo_loss_by_hand():
    policy_chosen = torch.tensor([-10.0, -6.0], requires_grad=True)
    policy_rejected = torch.tensor([-15.0, -4.0])
    ref_chosen = torch.tensor([-12.0, -5.0])
    ref_rejected = torch.tensor([-14.0, -5.0])
    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    # row 0: chosen reward 0.1 * (-10 + 12) = 0.2, rejected 0.1 * (-15 + 14) = -0.1
    #        logit 0.3: log(1 + e^-0.3) = log(1.740818) = 0.554355
    # row 1: chosen 0.1 * (-6 + 5) = -0.1, rejected 0.1 * (-4 + 5) = 0.1
    #        logit -0.2: log(1 + e^0.2) = log(2.221403) = 0.798139
    # mean (0.554355 + 0.798139) / 2 = 0.676247
    torch.testing.assert_close(loss, torch.tensor(0.676247))
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(0.05))  # (0.2 - 0.1) / 2
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor(0.0))  # (-0.1 + 0.1) / 2
    torch.testing.assert_close(stats["rewards/margin"], torch.tensor(0.05))  # (0.3 - 0.2) / 2
    assert stats["rewards/accuracy"].item() == 0.5
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d/dpc = -beta * sigmoid(-logit) / B: row 0: -0.1 * 0.425557 / 2 = -0.021278
    #                                      row 1: -0.1 * 0.549834 / 2 = -0.027492
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([-0.021278, -0.027492]))


def test_dpo_loss_at_reference_is_ln2():
    # policy == reference: all implicit rewards 0, loss = log 2 = 0.693147 for any beta
    x = torch.tensor([-3.0, -7.0])
    loss, stats = dpo_loss(x, x - 1, x, x - 1, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.693147))
    assert stats["rewards/accuracy"].item() == 0.0
