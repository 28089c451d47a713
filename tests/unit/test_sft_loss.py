import math

import torch

from tether.losses.sft import sft_loss

LN3 = math.log(3.0)


def _example():
    # input_ids of length 4; a 2-token prompt (labels -100), then 2 response tokens.
    # logits[t] predicts labels[t + 1]: logits[1] -> label 0, logits[2] -> label 1;
    # logits[0] predicts a prompt token and logits[3] predicts nothing.
    logits = torch.tensor([[[4.0, -4.0], [LN3, 0.0], [0.0, 0.0], [9.0, 1.0]]])
    labels = torch.tensor([[-100, -100, 0, 1]])
    return logits, labels


def test_sft_loss_by_hand():
    logits, labels = _example()
    loss, stats = sft_loss(logits, labels)
    # NLL: -log(3/4) = 0.287682 and -log(1/2) = 0.693147; sum 0.980829 over 2 tokens
    torch.testing.assert_close(loss, torch.tensor(0.490415))
    assert stats["sft/tokens"].item() == 2
    torch.testing.assert_close(stats["sft/nll_sum"], torch.tensor(0.980829))


def test_sft_loss_with_a_global_normalizer():
    logits, labels = _example()
    loss, _ = sft_loss(logits, labels, normalizer=4)  # 0.980829 / 4 = 0.245207
    torch.testing.assert_close(loss, torch.tensor(0.245207))
    loss, _ = sft_loss(logits, labels, normalizer=torch.tensor(8.0))  # / 8 = 0.122604
    torch.testing.assert_close(loss, torch.tensor(0.122604))


def test_sft_loss_ignores_prompt_positions():
    logits, labels = _example()
    base, _ = sft_loss(logits, labels)
    changed = logits.clone()
    changed[0, 0] = torch.tensor([-30.0, 30.0])  # predicts a -100 label
    changed[0, 3] = torch.tensor([0.0, 50.0])  # predicts past the end
    changed.requires_grad_(True)
    loss, _ = sft_loss(changed, labels)
    torch.testing.assert_close(loss, base)
    loss.backward()
    assert changed.grad[0, 0].abs().sum().item() == 0.0
    assert changed.grad[0, 3].abs().sum().item() == 0.0
    assert changed.grad[0, 1].abs().sum().item() > 0.0


def test_sft_loss_matches_cross_entropy_over_a_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=g)
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[2, 4:] = -100
    loss, stats = sft_loss(logits, labels)
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, reference)
    # scored: row 0 has 3 of the shifted 5, row 1 all 5, row 2 labels 1..3 -> 3
    assert stats["sft/tokens"].item() == 11


def test_sft_loss_with_nothing_scored_is_zero():
    loss, stats = sft_loss(torch.randn(1, 3, 4), torch.full((1, 3), -100))
    assert loss.item() == 0.0 and stats["sft/tokens"].item() == 0
