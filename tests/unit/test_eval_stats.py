import pytest

from tether.eval.stats import distinct_n, wilson_interval, win_rate


def test_win_rate_counts_ties_as_half():
    wr = win_rate([3, 2, 1, 5], [1, 2, 4, 0])  # win, tie, loss, win
    assert (wr.wins, wr.ties, wr.losses) == (2, 1, 1)
    assert wr.rate == pytest.approx(2.5 / 4)
    assert wr.low < wr.rate < wr.high


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100, z = 1.96: centre = (0.5 + 0.019208) / 1.038415 = 0.5
    # half = 1.96 * sqrt(0.0025 + 0.00009604) / 1.038415 = 1.96 * 0.050951 / 1.038415 = 0.096170
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.5 - 0.096170, abs=1e-5) and high == pytest.approx(0.5 + 0.096170, abs=1e-5)
    assert wilson_interval(1.0, 10)[1] == pytest.approx(1.0) and wilson_interval(0.0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_distinct_n_by_hand():
    # bigrams: (a b) (b a) (a b) | (c c) -> 3 unique of 4
    assert distinct_n(["a b a b", "c c"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["x"], 2) == 0.0


def test_win_rate_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        win_rate([1.0], [])


@pytest.mark.parametrize("n", [1, 3, 4, 7, 10, 200])
def test_wilson_interval_holds_the_rate_exactly_at_the_edges(n):
    assert wilson_interval(1.0, n)[1] == 1.0 and wilson_interval(1.0, n)[0] < 1.0
    assert wilson_interval(0.0, n)[0] == 0.0 and wilson_interval(0.0, n)[1] > 0.0
