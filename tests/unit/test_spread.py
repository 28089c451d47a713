"""`eval.sampling.Spread`: how bon and eval lay their rows out over the processes of a launch."""

import pytest

from tether.eval.sampling import Spread, gather_owned


@pytest.mark.parametrize("total,batch,count", [(21, 4, 2), (7, 3, 3), (5, 8, 4), (1, 4, 2), (12, 4, 4)])
def test_every_row_is_owned_once_and_every_process_runs_as_many(total, batch, count):
    parts = [Spread.of(total, batch, (p, count)) for p in range(count)]
    owned = sorted(r for s in parts for r, own in zip(s.rows, s.owned) if own)
    assert owned == list(range(total))
    assert len({len(s.rows) for s in parts}) == 1  # a sharded forward is a collective
    assert len({len(s.batches) for s in parts}) == 1
    for s in parts:
        for first, size, offset, rows in s.batches:
            assert 0 <= offset and offset + size <= rows  # the noise window lies in the batch
            at = s.rows[first] - offset  # the batch's first row
            assert list(s.rows[first:first + size]) == list(range(at + offset, at + offset + size))


def test_one_process_is_the_plain_order():
    s = Spread.of(10, 4)
    assert s.rows == tuple(range(10)) and all(s.owned)
    assert s.batches == ((0, 4, 0, 4), (4, 4, 0, 4), (8, 2, 0, 2))


def test_gather_owned_drops_repeats_and_restores_order():
    got = gather_owned(None, [4, 2, 3, 2], [True, False, True, True], x=["e", "c?", "d", "c"])
    assert got == {"x": ["c", "d", "e"]}
