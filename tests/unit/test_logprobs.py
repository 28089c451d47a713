import math

import torch

from tether.ops.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs

LN3 = math.log(3.0)


def test_token_logprobs_two_token_vocab_by_hand():
    # logits [ln 3, 0] -> softmax = [3/4, 1/4]; log(3/4) = -0.287682, log(1/4) = -1.386294
    logits = torch.tensor([[[LN3, 0.0], [LN3, 0.0]]])  # (1, 2, 2)
    tokens = torch.tensor([[0, 1]])
    out = token_logprobs(logits, tokens)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[-0.287682, -1.386294]]), atol=1e-5, rtol=0)


def test_token_logprobs_temperature_divides_logits():
    # logits [ln 9, 0] at T=2 become [ln 3, 0]: p(token 0) = 3/4, log = -0.287682.
    # At T=1 the same logits give p = 9/10, log = -0.105361.
    logits = torch.tensor([[[math.log(9.0), 0.0]]])
    tokens = torch.tensor([[0]])
    at_2 = token_logprobs(logits, tokens, temperature=2.0)
    torch.testing.assert_close(at_2, torch.tensor([[-0.287682]]), atol=1e-5, rtol=0)
    at_1 = token_logprobs(logits, tokens)
    torch.testing.assert_close(at_1, torch.tensor([[-0.105361]]), atol=1e-5, rtol=0)


def test_token_logprobs_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    reference = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), reference)


def test_token_logprobs_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    whole = token_logprobs(logits, tokens)
    # 60 elements: a row (5 * 11 = 55) fits, one row per chunk.
    by_rows = token_logprobs(logits, tokens, max_chunk_elements=60)
    # 20 elements: a row does not fit, so rows are split in time too (1 position per chunk).
    by_positions = token_logprobs(logits, tokens, max_chunk_elements=20)
    torch.testing.assert_close(by_rows, whole)
    torch.testing.assert_close(by_positions, whole)


def test_token_logprobs_bf16_input_gives_float32_and_does_not_modify_logits():
    logits = torch.tensor([[[LN3, 0.0]]], dtype=torch.bfloat16)
    before = logits.clone()
    out = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert out.dtype == torch.float32
    assert torch.equal(logits, before)
    # bf16(ln 3) = 1.1015625; at T=2: log sigmoid(0.550781) = -0.455207, near the exact -0.455746
    torch.testing.assert_close(out, torch.tensor([[-0.455746]]), atol=2e-3, rtol=0)


def test_token_logprobs_gradient_matches_log_softmax():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    tokens = torch.tensor([[0, 1, 2], [3, 2, 1]])
    token_logprobs(logits, tokens, max_chunk_elements=4).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


def test_token_logprobs_gradient_by_hand_with_temperature_and_weights():
    # d log p(y) / d logits = (onehot(y) - p) / T, times the upstream gradient.
    # [ln 9, 0] at T=2: p = [3/4, 1/4]. Token 0 with weight 2: 2 * ([1, 0] - p) / 2 = [0.25, -0.25].
    # Token 1 with weight -1: -1 * ([0, 1] - p) / 2 = [0.375, -0.375].
    logits = torch.tensor([[[math.log(9.0), 0.0], [math.log(9.0), 0.0]]], requires_grad=True)
    out = token_logprobs(logits, torch.tensor([[0, 1]]), temperature=2.0)
    (out * torch.tensor([[2.0, -1.0]])).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.25, -0.25], [0.375, -0.375]]]))


def test_token_logprobs_bf16_gradient_reaches_the_logits_in_their_dtype():
    logits = torch.randn(2, 3, 5).to(torch.bfloat16).requires_grad_()
    tokens = torch.tensor([[0, 1, 2], [4, 3, 2]])
    token_logprobs(logits, tokens, temperature=0.7, max_chunk_elements=5).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().float().requires_grad_()
    torch.log_softmax(reference / 0.7, -1).gather(-1, tokens[..., None]).sum().backward()
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=1e-2, rtol=1e-2)


def test_entropy_by_hand():
    # uniform over 4 -> ln 4 = 1.386294
    # [ln 3, 0] -> p = [3/4, 1/4]: H = 0.75 * 0.287682 + 0.25 * 1.386294 = 0.562335
    # [ln 9, 0] at T=2 is [ln 3, 0] again: 0.562335
    uniform = torch.zeros(1, 1, 4)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[1.386294]]))
    two = torch.tensor([[[LN3, 0.0], [math.log(9.0), 0.0]]])
    out = entropy_from_logits(two, temperature=1.0)
    torch.testing.assert_close(out[0, 0], torch.tensor(0.562335))
    torch.testing.assert_close(
        entropy_from_logits(two[:, 1:], temperature=2.0), torch.tensor([[0.562335]])
    )
    # [ln 9, 0] at T=1: p = [0.9, 0.1], H = 0.9 * 0.105361 + 0.1 * 2.302585 = 0.325083
    torch.testing.assert_close(out[0, 1], torch.tensor(0.325083))


def test_sequence_logprobs_shifts_and_skips_ignored_labels():
    # input_ids length 4, labels [-100, 0, 1, -100]: logits[0] predicts label 0,
    # logits[1] predicts label 1, logits[2] predicts an ignored label, logits[3] predicts nothing.
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [5.0, -5.0], [7.0, 7.0]]])
    labels = torch.tensor([[-100, 0, 1, -100]])
    total, count = sequence_logprobs(logits, labels)
    # log(3/4) + log(1/2) = -0.287682 - 0.693147 = -0.980829
    torch.testing.assert_close(total, torch.tensor([-0.980829]))
    assert count.tolist() == [2]


def test_sequence_logprobs_row_with_nothing_scored():
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[-100, -100, -100], [-100, 1, 1]])
    total, count = sequence_logprobs(logits, labels)
    # row 0: nothing; row 1: two tokens at log(1/2) = 2 * -0.693147
    torch.testing.assert_close(total, torch.tensor([0.0, -1.386294]))
    assert count.tolist() == [0, 2]


def test_chunks_tile_the_grid_within_the_element_budget():
    from tether.ops.logprobs import _chunks

    # (B, T, V) = (3, 5, 11): a row is 55 logits
    for budget, largest in [(10_000, 165), (120, 110), (60, 55), (20, 11), (5, 11)]:
        seen = torch.zeros(3, 5, dtype=torch.long)
        sizes = []
        for bs, ts in _chunks(3, 5, 11, budget):
            seen[bs, ts] += 1
            sizes.append(seen[bs, ts].numel() * 11)
        assert (seen == 1).all()  # every position exactly once
        # 10_000 -> all 3 rows at once (165); 120 -> 2 rows (110); 60 -> 1 row (55);
        # 20 -> 1 position (11) per chunk; 5 -> still at least 1 position (11)
        assert max(sizes) == largest


def test_logprobs_and_entropy_from_one_pass_match_the_separate_functions():
    from tether.ops.logprobs import token_logprobs_and_entropy

    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 5, 11, generator=g) * 2).requires_grad_()
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    for budget in (10_000, 55, 20):  # one chunk, a row per chunk, positions per chunk
        logprobs, entropy = token_logprobs_and_entropy(logits, tokens, 0.7, max_chunk_elements=budget)
        torch.testing.assert_close(logprobs, token_logprobs(logits, tokens, 0.7))
        torch.testing.assert_close(entropy, entropy_from_logits(logits.detach(), 0.7))
        assert not entropy.requires_grad
        # the entropy adds nothing to the gradient: it is a metric
        (logprobs.sum() + entropy.sum()).backward()
        with_entropy = logits.grad.clone()
        logits.grad = None
        token_logprobs(logits, tokens, 0.7).sum().backward()
        torch.testing.assert_close(with_entropy, logits.grad)
        logits.grad = None
    assert token_logprobs_and_entropy(logits, tokens, entropy=False)[1] is None


def test_entropy_of_a_two_token_vocab_by_hand_from_the_logprob_pass():
    from tether.ops.logprobs import token_logprobs_and_entropy

    # [ln 3, 0]: p = [3/4, 1/4], H = 0.562335; [ln 9, 0] at T=2 is the same distribution
    logits = torch.tensor([[[LN3, 0.0]], [[math.log(9.0), 0.0]]])
    _, at_1 = token_logprobs_and_entropy(logits[:1], torch.tensor([[0]]))
    _, at_2 = token_logprobs_and_entropy(logits[1:], torch.tensor([[1]]), temperature=2.0)
    torch.testing.assert_close(at_1, torch.tensor([[0.562335]]))
    torch.testing.assert_close(at_2, torch.tensor([[0.562335]]))


def test_backward_keeps_only_the_logits_themselves():
    # bf16 logits at T = 0.7: the float32 upcast and the division by T are redone per chunk in
    # backward, so the graph holds no (B, T, V) tensor but the logits (an earlier version saved
    # a float32 copy of the scaled logits, twice the size of bf16 ones)
    logits = torch.randn(4, 6, 50).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 50, (4, 6))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(logits, tokens, temperature=0.7, max_chunk_elements=300)
    full = [t for t in saved if t.numel() >= logits.numel()]
    assert len(full) == 1 and full[0].dtype == torch.bfloat16 and full[0].data_ptr() == logits.data_ptr()
    out.sum().backward()
    reference = logits.detach().float().requires_grad_()
    torch.log_softmax(reference / 0.7, -1).gather(-1, tokens[..., None]).sum().backward()
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=1e-2, rtol=1e-2)


def test_gradient_at_a_temperature_is_the_same_bits_as_autograd_dividing_last():
    # the backward applies 1/T after the softmax term, as autograd's DivBackward did before the
    # division was folded in: float32 results are bit-identical to that order of operations
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 4, 17, generator=g) * 3).requires_grad_()
    tokens = torch.randint(0, 17, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g)
    (token_logprobs(logits, tokens, temperature=0.7) * weights).sum().backward()
    ours, logits.grad = logits.grad.clone(), None
    x = logits.detach() / 0.7
    expected = torch.softmax(x, -1).mul_(-weights[..., None])
    expected.scatter_add_(-1, tokens[..., None], weights[..., None])
    assert torch.equal(ours, expected / 0.7)
