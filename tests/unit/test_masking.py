import math

import pytest
import torch

from tether.ops.masking import (
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask,
)


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # the inf and nan sit on masked-out positions and must not leak: 1 + 2 + 4 = 7, mean 7/3
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(7.0))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3))
    # per row: sums [3, 4], means [3/2, 4/1]
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_of_empty_mask_is_zero():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0, 0], [1, 0]])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([0.0, 3.0]))


def test_masked_var():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 50.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(5.0 / 3))  # Bessel: 5 / 3
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(5.0 / 4))


def test_masked_var_with_fewer_than_two_entries():
    x = torch.tensor([3.0, 7.0])
    assert masked_var(x, torch.tensor([1, 0])).item() == 0.0
    assert masked_var(x, torch.tensor([0, 0])).item() == 0.0
    assert masked_var(x, torch.tensor([0, 0]), unbiased=False).item() == 0.0


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # entries [1, 2, 3, 4]: mean 2.5, unbiased var 5/3, std sqrt(5/3) = 1.290994
    # (x - 2.5) / 1.290994 = [-1.161895, -0.387298, 0.387298, 1.161895]; masked-out -> 0
    expected = torch.tensor([[-1.161895, -0.387298, 0.0], [0.387298, 1.161895, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    # shift_mean=False adds the mean 2.5 back: [1.338105, 2.112702, 2.887298, 3.661895]
    expected_scaled = torch.tensor([[1.338105, 2.112702, 0.0], [2.887298, 3.661895, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), expected_scaled)


def test_response_mask_single_eos_includes_the_eos():
    responses = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9]])
    # row 0: first EOS (2) at index 2 -> [1, 1, 1, 0, 0]; row 1: EOS first -> [1, 0, 0, 0, 0]
    out = response_mask(responses, eos_token_ids=2)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]


def test_response_mask_multiple_eos_ids_and_no_eos():
    responses = torch.tensor([[5, 3, 2, 7], [5, 6, 7, 8], [4, 4, 3, 2]])
    # eos ids {2, 3}: row 0 stops at the 3 (index 1); row 1 has none -> all 1; row 2 at index 2
    out = response_mask(responses, eos_token_ids=[2, 3])
    assert out.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]


def test_response_mask_pad_equal_to_eos():
    # GPT-2 style: pad == eos == 0; the first 0 is the real EOS and is kept
    responses = torch.tensor([[5, 0, 0, 0], [5, 6, 7, 8]])
    out = response_mask(responses, eos_token_ids=(0,), pad_token_id=0)
    assert out.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], [2, 0, 3, 0]),
        ([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]], [2, 3, 0, 3]),  # left-padded
    ],
)
def test_last_token_index(mask, expected):
    out = last_token_index(torch.tensor(mask))
    assert out.dtype == torch.long
    assert out.tolist() == expected
    assert last_token_index(torch.tensor(mask).bool()).tolist() == expected


def test_whiten_output_has_unit_variance_on_masked_entries():
    x = torch.tensor([2.0, 4.0, 8.0, 1000.0])
    mask = torch.tensor([True, True, True, False])
    out = masked_whiten(x, mask)
    # mean and variance of the three real entries become 0 and 1 (up to eps)
    assert abs(out[:3].mean().item()) < 1e-6
    assert math.isclose(out[:3].var().item(), 1.0, rel_tol=1e-6)
    assert out[3].item() == 0.0


class _OtherShard:
    """A stand-in for an all-reduce across two processes: adds what the other process (holding
    x, mask) would contribute to each of the two sums `masked_whiten` reduces, in call order."""

    def __init__(self, x, mask):
        self.x, self.mask, self.mean = x, mask, None

    def __call__(self, t):
        if self.mean is None:  # first call: (sum, count)
            total = t + torch.stack([masked_sum(self.x, self.mask), self.mask.sum().to(t.dtype)])
            self.mean = total[0] / total[1]
            return total
        return t + masked_sum((self.x - self.mean) ** 2, self.mask)  # second: centred squares


def test_whitening_across_processes_equals_whitening_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen) * 3 + 1
    mask = (torch.rand(6, 5, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    for shift in (True, False):
        whole = masked_whiten(x, mask, shift_mean=shift)
        mine = masked_whiten(x[:2], mask[:2], shift_mean=shift, all_reduce=_OtherShard(x[2:], mask[2:]))
        torch.testing.assert_close(mine, whole[:2], rtol=1e-5, atol=1e-6)
        alone = masked_whiten(x[:2], mask[:2], shift_mean=shift)  # without the reduction: differs
        assert (alone - whole[:2]).abs().max() > 0.05
