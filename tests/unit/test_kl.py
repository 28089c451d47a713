import pytest
import torch

from tether.ops.kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-1.5, -1.5, -3.0])
    # logp - ref = [0.5, -0.5, 0]
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, -0.5, 0.0]))
    # 0.5 * [0.25, 0.25, 0] = [0.125, 0.125, 0]
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.125, 0.125, 0.0]))
    # log r = ref - logp = [-0.5, 0.5, 0]
    # k3 = (e^-0.5 - 1) + 0.5 = 0.606531 - 1 + 0.5 = 0.106531
    #      (e^0.5 - 1) - 0.5 = 1.648721 - 1 - 0.5 = 0.148721; and 0 when equal
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.106531, 0.148721, 0.0]))


def test_k3_is_non_negative_and_k1_is_not():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k1(logp, ref) < 0).any()


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    # pi = [0.8, 0.2], ref = [0.5, 0.5]:
    # KL = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.376003 - 0.183258 = 0.192745
    # The expectation over samples of pi is the p-weighted sum over the two outcomes.
    p = torch.tensor([0.8, 0.2])
    logp, ref = p.log(), torch.tensor([0.5, 0.5]).log()
    expected = torch.tensor(0.192745)
    torch.testing.assert_close((p * kl_k1(logp, ref)).sum(), expected)
    torch.testing.assert_close((p * kl_k3(logp, ref)).sum(), expected)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    ctl.load_state_dict({"value": 0.2})
    assert ctl.state_dict() == {"value": 0.2}


@pytest.mark.parametrize(
    "kl, expected",
    [
        # e = 9/6 - 1 = 0.5, clipped to 0.2: 0.1 * (1 + 0.2 * 256/10000) = 0.1 * 1.00512
        (9.0, 0.100512),
        # e = 6.6/6 - 1 = 0.1, inside the clip: 0.1 * (1 + 0.1 * 0.0256) = 0.1 * 1.00256
        (6.6, 0.100256),
        # e = 3/6 - 1 = -0.5, clipped to -0.2: 0.1 * (1 - 0.00512) = 0.099488
        (3.0, 0.099488),
        # on target: e = 0, no change
        (6.0, 0.1),
    ],
)
def test_adaptive_controller_one_update(kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, rel=1e-9)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    other = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    # the next update continues from the restored value: 0.100512 * 1.00512 = 0.101027
    other.update(9.0, 256)
    assert other.value == pytest.approx(0.101026621, rel=1e-8)


def test_adaptive_controller_rejects_bad_config():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
