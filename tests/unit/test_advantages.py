import torch

from tether.ops.advantages import gae, kl_penalised_rewards


def test_kl_penalised_rewards_score_only_on_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, -5.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0, float("-inf")], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalised_rewards(logprobs, ref, scores, mask, kl_coef=0.1)
    # row 0: kl = [0.5, -1, 0, (masked; -inf ref must not leak)]
    #        rewards = -0.1 * kl = [-0.05, 0.1, 0] + score 2 on index 2 -> [-0.05, 0.1, 2, 0]
    # row 1: kl = [1, 0, 0, 0]; rewards = [-0.1, 0, 0, -1 (score at index 3)]
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1, 0.0, 0.0, -1.0]])
    )


def test_kl_penalised_rewards_sign_and_empty_row():
    # policy more confident than the reference -> positive kl -> negative reward
    logprobs = torch.tensor([[-0.1, -0.1], [-0.1, -0.1]])
    ref = torch.tensor([[-1.1, -1.1], [-1.1, -1.1]])
    mask = torch.tensor([[1, 1], [0, 0]])
    rewards, _ = kl_penalised_rewards(logprobs, ref, torch.tensor([0.0, 5.0]), mask, kl_coef=0.5)
    # row 0: -0.5 * 1 on each token, score 0; row 1 has no token, so no score anywhere
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, -0.5], [0.0, 0.0]]))


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72; the value after the last token is 0
    # t=2: delta = 1 + 0.9*0 - 0.4 = 0.6;            A2 = 0.6
    # t=1: delta = 0 + 0.9*0.4 - 0.2 = 0.16;         A1 = 0.16 + 0.72*0.6 = 0.592
    # t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32;        A0 = -0.32 + 0.72*0.592 = 0.10624
    # returns = A + V = [0.60624, 0.792, 1.0]
    torch.testing.assert_close(adv, torch.tensor([[0.10624, 0.592, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.60624, 0.792, 1.0]]))


def test_gae_ignores_padding_values_and_bootstraps_from_zero():
    rewards = torch.tensor([[0.0, 2.0, 7.0]])
    values = torch.tensor([[1.0, 0.5, 9.0]])  # 7 and 9 at the pad must not enter
    mask = torch.tensor([[1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1 (last real token): delta = 2 + 0.9*0 - 0.5 = 1.5;  A1 = 1.5
    # t=0: delta = 0 + 0.9*0.5 - 1 = -0.55;                  A0 = -0.55 + 0.72*1.5 = 0.53
    torch.testing.assert_close(adv, torch.tensor([[0.53, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.53, 2.0, 0.0]]))


def test_gae_skips_a_masked_hole():
    # a masked-out token in the middle (e.g. a tool output) is as if it were not there:
    # the same as the 2-token row r = [0, 1], V = [0.3, 0.6] with gamma = lam = 1
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.3, -4.0, 0.6]])
    mask = torch.tensor([[1, 0, 1]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # t=2: A = 1 - 0.6 = 0.4;  t=0: delta = 0 + 0.6 - 0.3 = 0.3, A = 0.3 + 0.4 = 0.7
    torch.testing.assert_close(adv, torch.tensor([[0.7, 0.0, 0.4]]))


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t, for two rows at once
    rewards = torch.tensor([[0.1, -0.2, 3.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 0.5], [0.25, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: returns-to-go [2.9, 2.8, 3.0] minus V [1, 2, 0.5] = [1.9, 0.8, 2.5]
    # row 1: 1.0 - 0.25 = 0.75, the rest masked
    torch.testing.assert_close(adv, torch.tensor([[1.9, 0.8, 2.5], [0.75, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.9, 2.8, 3.0], [1.0, 0.0, 0.0]]))


def test_gae_with_default_gamma_and_lambda():
    # defaults gamma = 1, lam = 0.95; rewards only at the end
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5]])
    adv, _ = gae(rewards, values, torch.ones(1, 2))
    # t=1: delta = 1 - 0.5 = 0.5; t=0: delta = 0.5 - 0.5 = 0, A0 = 0 + 0.95 * 0.5 = 0.475
    torch.testing.assert_close(adv, torch.tensor([[0.475, 0.5]]))
