import torch

from tether.losses.reward import kwise_loss, pairwise_loss

# softplus(-d) = -log sigmoid(d) = log(1 + e^-d):
SP_1 = 0.313262  # d = 1
SP_2 = 0.126928  # d = 2
SP_M1 = 1.313262  # d = -1
SP_M2 = 2.126928  # d = -2
LN2 = 0.693147  # d = 0


def test_pairwise_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0])
    loss, stats = pairwise_loss(chosen, rejected)
    # diffs [1, 0] -> (0.313262 + 0.693147) / 2 = 0.503204
    torch.testing.assert_close(loss, torch.tensor(0.503204))
    assert stats["rm/accuracy"].item() == 0.5  # the tie is not a win
    torch.testing.assert_close(stats["rm/margin_mean"], torch.tensor(0.5))
    loss.backward()
    # d/dc -log sigmoid(c - r) = -(1 - sigmoid(d)) = -sigmoid(-d), over 2:
    # d=1: -0.268941/2 = -0.134471; d=0: -0.5/2 = -0.25
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.134471, -0.25]))


def test_pairwise_loss_with_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    loss, stats = pairwise_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]))
    # diffs minus margin [0.5, 0]: log(1 + e^-0.5) = 0.474077; (0.474077 + 0.693147) / 2 = 0.583612
    torch.testing.assert_close(loss, torch.tensor(0.583612))
    torch.testing.assert_close(stats["rm/margin_mean"], torch.tensor(0.5))  # margin not included


def test_pairwise_loss_is_stable_for_huge_gaps():
    loss, _ = pairwise_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    torch.testing.assert_close(loss, torch.tensor(200.0))  # log(1 + e^200) = 200, not inf


def test_kwise_k3_equals_mean_of_three_pairwise_losses():
    # order by rank: response 0 (rank 0), response 2 (rank 1), response 1 (rank 2)
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    ranks = torch.tensor([[0, 2, 1]])
    loss, stats = kwise_loss(scores, ranks)
    # pairs: (0 over 2) d = 1, (0 over 1) d = 2, (2 over 1) d = 1
    # (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151
    torch.testing.assert_close(loss, torch.tensor(0.251151))
    pair_loss, _ = pairwise_loss(torch.tensor([3.0, 3.0, 2.0]), torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(loss, pair_loss)
    assert stats["rm/accuracy"].item() == 1.0
    assert stats["rm/num_pairs"].item() == 3


def test_kwise_all_pairs_wrong():
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    ranks = torch.tensor([[0, 2, 1]])
    loss, stats = kwise_loss(scores, ranks)
    # pairs: d = 1 - 2 = -1, 1 - 3 = -2, 2 - 3 = -1: (1.313262 + 2.126928 + 1.313262) / 3 = 1.584484
    torch.testing.assert_close(loss, torch.tensor(1.584484))
    assert stats["rm/accuracy"].item() == 0.0


def test_kwise_tie_gives_no_pair():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    ranks = torch.tensor([[0, 1, 1]])
    loss, stats = kwise_loss(scores, ranks)
    # pairs: (0 over 1) d = 2, (0 over 2) d = 1; responses 1 and 2 tie
    # (0.126928 + 0.313262) / 2 = 0.220095
    torch.testing.assert_close(loss, torch.tensor(0.220095))
    assert stats["rm/num_pairs"].item() == 2


def test_kwise_invalid_padding_response_is_ignored():
    scores = torch.tensor([[3.0, 1.0, 100.0]])
    ranks = torch.tensor([[0, 1, 2]])
    valid = torch.tensor([[True, True, False]])
    loss, stats = kwise_loss(scores, ranks, valid)
    # only (0 over 1), d = 2 -> 0.126928; the padding's 100 would otherwise add 2 pairs
    torch.testing.assert_close(loss, torch.tensor(SP_2))
    assert stats["rm/num_pairs"].item() == 1


def test_kwise_each_prompt_counts_once():
    # prompt A: the 3-pair example above, mean 0.251151, all right
    # prompt B: 2 valid responses, one pair with d = 0 - 2 = -2 -> 2.126928, wrong
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, -7.0]])
    ranks = torch.tensor([[0, 2, 1], [0, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = kwise_loss(scores, ranks, valid)
    # per prompt: (0.251151 + 2.126928) / 2 = 1.189040
    # (pooling the 4 pairs would give (0.753452 + 2.126928) / 4 = 0.720095 instead)
    torch.testing.assert_close(loss, torch.tensor(1.189040))
    # accuracy is pooled over pairs: 3 right of 4 = 0.75
    assert stats["rm/accuracy"].item() == 0.75
    assert stats["rm/num_pairs"].item() == 4


def test_kwise_prompt_without_pairs_is_left_out():
    scores = torch.tensor([[3.0, 1.0], [5.0, 5.0]], requires_grad=True)
    ranks = torch.tensor([[0, 1], [0, 0]])  # prompt 2: a tie, no pair
    loss, _ = kwise_loss(scores, ranks)
    torch.testing.assert_close(loss, torch.tensor(SP_2))  # only prompt 1, d = 2
    loss.backward()
    assert scores.grad[1].abs().sum().item() == 0.0
