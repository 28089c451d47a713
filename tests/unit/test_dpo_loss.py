import math

import pytest
import torch
import torch.nn.functional as F

from tether.losses.dpo import (
    LOSSES,
    PAIR_LOSSES,
    REFERENCE_FREE,
    dpo_loss,
    log_odds,
    orpo_loss,
    pair_losses,
    preference_loss,
    simpo_loss,
)


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


# ---------------------------------------------------------------------------------------------
# The DPO family. Throughout, a(x) = -log sigmoid(x) = log(1 + e^-x), and a(-x) = a(x) + x.
# ---------------------------------------------------------------------------------------------


def test_loss_names():
    assert PAIR_LOSSES == ("sigmoid", "ipo", "robust", "conservative", "hinge")
    assert REFERENCE_FREE == ("simpo", "orpo")
    assert LOSSES == ("sigmoid", "ipo", "robust", "conservative", "hinge", "simpo", "orpo")


def test_pair_losses_sigmoid_by_hand():
    h = torch.tensor([2.0, -1.0, 0.0])
    losses = pair_losses("sigmoid", h, beta=0.5)
    # beta h = [1, -0.5, 0]: a(1) = log(1 + e^-1) = log(1.367879) = 0.313262
    #                        a(-0.5) = log(1 + e^0.5) = log(2.648721) = 0.974077
    #                        a(0) = log 2 = 0.693147
    torch.testing.assert_close(losses, torch.tensor([0.313262, 0.974077, 0.693147]))


def test_pair_losses_ipo_by_hand_with_gradient():
    h = torch.tensor([3.0, 0.0, 2.0], requires_grad=True)
    losses = pair_losses("ipo", h, beta=0.25)
    # target margin 1 / (2 beta) = 1 / 0.5 = 2: (3 - 2)^2 = 1, (0 - 2)^2 = 4, (2 - 2)^2 = 0
    torch.testing.assert_close(losses, torch.tensor([1.0, 4.0, 0.0]))
    losses.sum().backward()
    # d/dh (h - 2)^2 = 2 (h - 2) = [2, -4, 0]
    torch.testing.assert_close(h.grad, torch.tensor([2.0, -4.0, 0.0]))


def test_preference_loss_ipo_by_hand():
    # the same log-probs as test_dpo_loss_by_hand; IPO's h is NOT scaled by beta
    policy_chosen = torch.tensor([-10.0, -6.0], requires_grad=True)
    policy_rejected = torch.tensor([-15.0, -4.0])
    ref_chosen = torch.tensor([-12.0, -5.0])
    ref_rejected = torch.tensor([-14.0, -5.0])
    loss, stats = preference_loss("ipo", policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.25)
    # row 0: h = (-10 + 12) - (-15 + 14) = 2 + 1 = 3;  (3 - 2)^2 = 1
    # row 1: h = (-6 + 5) - (-4 + 5) = -1 - 1 = -2;   (-2 - 2)^2 = 16
    # mean (1 + 16) / 2 = 8.5
    torch.testing.assert_close(loss, torch.tensor(8.5))
    # stats are DPO's implicit rewards, beta = 0.25: chosen [0.5, -0.25], rejected [-0.25, 0.25]
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(0.125))  # (0.5 - 0.25) / 2
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor(0.0))  # (-0.25 + 0.25) / 2
    torch.testing.assert_close(stats["rewards/margin"], torch.tensor(0.125))  # (0.75 - 0.5) / 2
    assert stats["rewards/accuracy"].item() == 0.5
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # d/dpc = 2 (h - 2) / B: row 0: 2 * 1 / 2 = 1, row 1: 2 * (-4) / 2 = -4
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([1.0, -4.0]))


def test_pair_losses_hinge_by_hand_with_gradient():
    h = torch.tensor([4.0, 1.0, -2.0], requires_grad=True)
    losses = pair_losses("hinge", h, beta=0.5)
    # beta h = [2, 0.5, -1]: max(0, 1 - 2) = 0, max(0, 1 - 0.5) = 0.5, max(0, 1 + 1) = 2
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.5, 2.0]))
    losses.sum().backward()
    # d/dh = -beta where 1 - beta h > 0, else 0: [0, -0.5, -0.5]
    torch.testing.assert_close(h.grad, torch.tensor([0.0, -0.5, -0.5]))


def test_pair_losses_robust_by_hand():
    h = torch.tensor([1.0, -0.5])
    losses = pair_losses("robust", h, beta=1.0, label_smoothing=0.1)
    # [(1 - eps) a(bh) - eps a(-bh)] / (1 - 2 eps) = a(bh) - eps bh / (1 - 2 eps), eps = 0.1:
    # bh = 1:    (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = (0.281936 - 0.131326) / 0.8 = 0.188262
    #            (= 0.313262 - 0.1 / 0.8 = 0.313262 - 0.125)
    # bh = -0.5: (0.9 * 0.974077 - 0.1 * 0.474077) / 0.8 = (0.876669 - 0.047408) / 0.8 = 1.036577
    #            (= 0.974077 + 0.05 / 0.8 = 0.974077 + 0.0625)
    torch.testing.assert_close(losses, torch.tensor([0.188262, 1.036577]))
    # with a large margin the robust loss goes below 0 (it is unbounded below): eps = 0.2, bh = 1.5:
    # a(1.5) = log(1 + e^-1.5) = 0.201413; 0.201413 - 0.2 * 1.5 / 0.6 = 0.201413 - 0.5 = -0.298587
    below = pair_losses("robust", torch.tensor([3.0]), beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(below, torch.tensor([-0.298587]))


def test_pair_losses_conservative_by_hand():
    h = torch.tensor([1.0, -0.5])
    losses = pair_losses("conservative", h, beta=1.0, label_smoothing=0.1)
    # (1 - eps) a(bh) + eps a(-bh) = a(bh) + eps bh, eps = 0.1:
    # bh = 1:    0.9 * 0.313262 + 0.1 * 1.313262 = 0.281936 + 0.131326 = 0.413262
    # bh = -0.5: 0.9 * 0.974077 + 0.1 * 0.474077 = 0.876669 + 0.047408 = 0.924077
    torch.testing.assert_close(losses, torch.tensor([0.413262, 0.924077]))


@pytest.mark.parametrize("kind", ["robust", "conservative"])
def test_label_noise_losses_at_eps_zero_are_sigmoid(kind):
    h = torch.tensor([2.0, -1.0, 0.0])
    # the sigmoid values of test_pair_losses_sigmoid_by_hand (beta 0.5)
    torch.testing.assert_close(pair_losses(kind, h, beta=0.5, label_smoothing=0.0),
                               torch.tensor([0.313262, 0.974077, 0.693147]))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_robust_loss_is_unbiased_under_label_flips(eps):
    # a label flipped with probability eps turns h into -h; in expectation the robust loss is
    # the clean sigmoid loss: (1 - eps) L(h) + eps L(-h) = a(beta h)
    h = torch.tensor([3.0, -2.0, 0.5, 0.0, 40.0], dtype=torch.float64)
    beta = 0.3
    expected = (1 - eps) * pair_losses("robust", h, beta, eps) + eps * pair_losses("robust", -h, beta, eps)
    clean = torch.tensor([math.log1p(math.exp(-beta * x)) for x in h.tolist()], dtype=torch.float64)
    torch.testing.assert_close(expected, clean)
    torch.testing.assert_close(expected, -F.logsigmoid(beta * h))


def test_pair_losses_reject_bad_arguments():
    h = torch.zeros(2)
    with pytest.raises(ValueError, match="pair loss"):
        pair_losses("simpo", h, 0.1)
    with pytest.raises(ValueError, match="pair loss"):
        pair_losses("nope", h, 0.1)
    for eps in (0.5, -0.1, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            pair_losses("robust", h, 0.1, eps)
    with pytest.raises(ValueError):
        preference_loss("orpo", h, h, h, h, 0.1)


def test_dpo_loss_is_preference_loss_sigmoid():
    pc, pr = torch.tensor([-10.0, -6.0]), torch.tensor([-15.0, -4.0])
    rc, rr = torch.tensor([-12.0, -5.0]), torch.tensor([-14.0, -5.0])
    loss, stats = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.676247))  # test_dpo_loss_by_hand
    dpo, dpo_stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(loss, dpo)
    assert stats.keys() == dpo_stats.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], dpo_stats[key])


def test_simpo_loss_by_hand_with_gradient():
    chosen = torch.tensor([-0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -0.8])
    loss, stats = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    # row 0: 2 * (-0.5 + 1.0) - 0.5 = 0.5;   a(0.5) = log(1 + e^-0.5) = log(1.606531) = 0.474077
    # row 1: 2 * (-1.0 + 0.8) - 0.5 = -0.9;  a(-0.9) = log(1 + e^0.9) = log(3.459603) = 1.241154
    # mean (0.474077 + 1.241154) / 2 = 0.857615
    torch.testing.assert_close(loss, torch.tensor(0.857615))
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(-1.5))  # 2 * (-0.5 - 1.0) / 2
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor(-1.8))  # 2 * (-1.0 - 0.8) / 2
    torch.testing.assert_close(stats["rewards/margin"], torch.tensor(0.3))  # (1.0 - 0.4) / 2
    assert stats["rewards/accuracy"].item() == 0.5  # -1 > -2 yes; -2 > -1.6 no
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # d/dchosen = -beta * sigmoid(-z) / B: row 0: -2 * sigmoid(-0.5) / 2 = -0.377541
    #                                      row 1: -2 * sigmoid(0.9) / 2 = -0.710950
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.377541, -0.710950]))


def test_simpo_gamma_is_the_margin_itself():
    # equal length-normalised log-probs: the logit is -gamma whatever beta: a(-1) = 1.313262
    x = torch.tensor([-0.7])
    for beta in (1.0, 2.5):
        loss, _ = simpo_loss(x, x, beta=beta, gamma=1.0)
        torch.testing.assert_close(loss, torch.tensor(1.313262))


def test_orpo_log_odds_by_hand():
    avg = torch.log(torch.tensor([0.5, 0.2, 0.8]))
    # p / (1 - p): 0.5 / 0.5 = 1 -> 0; 0.2 / 0.8 = 0.25 -> -1.386294; 0.8 / 0.2 = 4 -> 1.386294
    torch.testing.assert_close(log_odds(avg), torch.tensor([0.0, -1.386294, 1.386294]))
    # avg = 0 (p = 1) is clamped to -1e-6 and stays finite:
    # -1e-6 - log(1 - e^-1e-6) = -1e-6 - log(1e-6) = 13.815510
    at_one = log_odds(torch.tensor([0.0]))
    assert torch.isfinite(at_one).all()
    torch.testing.assert_close(at_one, torch.tensor([13.815510]))


def test_orpo_loss_by_hand_with_gradient():
    chosen = torch.log(torch.tensor([0.5, 0.5])).requires_grad_()
    rejected = torch.log(torch.tensor([0.2, 0.8]))
    nll = torch.tensor(2.0, requires_grad=True)
    loss, stats = orpo_loss(nll, chosen, rejected, lam=0.1)
    # log odds: chosen [0, 0], rejected [log 0.25, log 4] = [-1.386294, 1.386294]
    # row 0: d = 0 + 1.386294;  a(d) = log(1 + 1/4) = log 1.25 = 0.223144
    # row 1: d = 0 - 1.386294;  a(d) = log(1 + 4) = log 5 = 1.609438
    # L_OR = (0.223144 + 1.609438) / 2 = 0.916291;  total = 2 + 0.1 * 0.916291 = 2.091629
    torch.testing.assert_close(loss, torch.tensor(2.091629))
    torch.testing.assert_close(stats["orpo/nll"], torch.tensor(2.0))
    torch.testing.assert_close(stats["orpo/odds_ratio_loss"], torch.tensor(0.916291))
    torch.testing.assert_close(stats["orpo/log_odds_ratio"], torch.tensor(0.0))  # (1.386294 - 1.386294) / 2
    # rewards: lam * avg; chosen 0.1 * log 0.5 = -0.069315; rejected 0.1 * (log 0.2 + log 0.8) / 2
    #          = 0.1 * (-1.609438 - 0.223144) / 2 = -0.091629
    torch.testing.assert_close(stats["rewards/chosen"], torch.tensor(-0.069315))
    torch.testing.assert_close(stats["rewards/rejected"], torch.tensor(-0.091629))
    torch.testing.assert_close(stats["rewards/margin"], torch.tensor(0.022314))
    assert stats["rewards/accuracy"].item() == 0.5
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    assert nll.grad.item() == 1.0
    # d/davg_w = -lam * sigmoid(-d) * dlogodds/davg / B, dlogodds/davg = 1 / (1 - p) = 2 at p = 0.5
    # row 0: sigmoid(-1.386294) = 1 / (1 + 4) = 0.2:   -0.1 * 0.2 * 2 / 2 = -0.02
    # row 1: sigmoid(1.386294) = 1 / (1 + 1/4) = 0.8:  -0.1 * 0.8 * 2 / 2 = -0.08
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.02, -0.08]))
