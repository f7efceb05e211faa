"""report.stats against scipy on known numbers, and one case worked by hand."""
import math

import numpy as np
import pytest
from scipy import stats as sp

from ablation.report import stats as S


def test_worked_by_hand():
    """a = [1, 2, 3], b = [4, 6, 8].
    a: mean 2, var ((1-2)² + 0 + (3-2)²) / 2 = 1, sd 1; b: mean 6, var (4 + 0 + 4) / 2 = 4, sd 2.
    95 % t-interval of a: t(0.975, 2) = 4.302653 (the t table's 4.303), half-width
    4.302653 · 1 / √3 = 2.484138, so [-0.484138, 4.484138].
    Welch: se² = 1/3 + 4/3 = 5/3, t = (2 - 6) / √(5/3) = -3.098387;
    df = (5/3)² / ((1/3)² / 2 + (4/3)² / 2) = (25/9) / (17/18) = 50/17 = 2.941176;
    p = 2 · P(T_2.94 > 3.098) = 0.0548 (between the t table's 0.05 at 3.182 and 0.10 at 2.353
    for df 3, nearer 0.05)."""
    s = S.summarize([1, 2, 3])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    assert s.lo == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-6)
    assert s.hi == pytest.approx(4.484138, abs=1e-6)
    r = sp.ttest_ind([1, 2, 3], [4, 6, 8], equal_var=False)
    assert r.statistic == pytest.approx(-4 / math.sqrt(5 / 3), rel=1e-12)
    assert r.df == pytest.approx(50 / 17, rel=1e-12)
    c = S.compare([1, 2, 3], [4, 6, 8])
    assert c.diff == -4.0 and c.p == pytest.approx(0.0548, abs=5e-5)
    assert c.p == pytest.approx(float(r.pvalue), rel=1e-12)
    # the formula seeds_needed uses gives the same p at the sides' own n (3 a side)
    assert S.welch_p(-4.0, 1.0, 2.0, 3) == pytest.approx(c.p, rel=1e-12)


def test_holm_on_known_pvalues():
    """Sorted: 0.005 · 4 = 0.02, 0.01 · 3 = 0.03, 0.03 · 2 = 0.06, 0.04 · 1 = 0.04 -> 0.06
    (kept non-decreasing); in the given order: 0.03, 0.06, 0.06, 0.02. None is no test: not
    counted in m, left None."""
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = S.holm([0.01, None, 0.04, 0.03, 0.005])
    assert out[1] is None and out[0] == pytest.approx(0.03) and out[2] == pytest.approx(0.06)
    assert S.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert S.holm([]) == [] and S.holm([None]) == [None]


@pytest.mark.parametrize("seed", range(5))
def test_interval_and_tests_match_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(90.0, 0.7, 3 + seed)
    b = rng.normal(90.5, 1.5, 2 + 2 * seed)
    s = S.summarize(a)
    lo, hi = sp.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=sp.sem(a))
    assert (s.lo, s.hi) == pytest.approx((lo, hi), rel=1e-12)
    assert s.sd == pytest.approx(np.std(a, ddof=1), rel=1e-12)
    c = S.compare(a, b)
    assert c.p == pytest.approx(sp.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert c.diff == pytest.approx(a.mean() - b.mean())
    one = S.compare(a, figure=91.0)
    assert one.p == pytest.approx(sp.ttest_1samp(a, 91.0).pvalue, rel=1e-12)
    assert S.one_sample_p(one.diff, s.sd, len(a)) == pytest.approx(one.p, rel=1e-12)


def test_summaries_of_few_runs():
    assert S.summarize([]) == S.Summary(0)
    assert S.summarize([99.1]) == S.Summary(1, 99.1)
    assert S.summarize([99.1]).holds(99.1) is None  # no interval from one run
    c = S.compare([99.1], [98.0, 98.4])
    assert c.p is None and c.diff == pytest.approx(0.9)
    assert S.compare([], [1.0, 2.0]).diff is None
    assert S.compare([3.0, 3.0], [3.0, 3.0]).p == 1.0  # no spread, same value
    assert S.compare([3.0, 3.0], [4.0, 4.0]).p == 0.0  # no spread, different values


def test_seeds_needed_is_the_first_n_that_reaches_the_level():
    c = S.compare([89.1, 89.9, 90.3], [89.0, 89.3, 89.6])
    n = S.seeds_needed(c, 0.05)
    sd_a, sd_b = c.a.sd, c.b.sd
    assert S.welch_p(c.diff, sd_a, sd_b, n) < 0.05 <= S.welch_p(c.diff, sd_a, sd_b, n - 1)
    assert S.seeds_needed(c, 0.01) > n  # a stricter level needs more
    big = S.compare([1.0, 2.0, 3.0], [11.0, 12.0, 13.0])
    assert big.p < 0.05 and S.seeds_needed(big) == 2  # already settled at the smallest n
    assert S.seeds_needed(S.compare([1.0, 2.0], [2.0, 1.0])) is None  # no difference
    assert S.seeds_needed(S.compare([1.0, 1.01], [1.0, 1.02]), cap=30) is None  # 41 needed
    # one run a side: the other side's sd stands in for it
    one = S.compare([91.55], [88.6, 89.9, 90.0])
    sd = one.b.sd
    m = S.seeds_needed(one, 0.05)
    assert S.welch_p(one.diff, sd, sd, m) < 0.05 <= S.welch_p(one.diff, sd, sd, m - 1)
    assert S.seeds_needed(S.compare([1.0], [2.0])) is None  # no spread anywhere
    fig = S.compare([99.0, 99.2, 99.1], figure=99.0)
    k = S.seeds_needed(fig, 0.05)
    assert S.one_sample_p(fig.diff, fig.a.sd, k) < 0.05 <= S.one_sample_p(fig.diff, fig.a.sd,
                                                                          k - 1)


def test_beyond_noise_says_the_spread_and_n_it_used():
    base, new = [89.2, 89.9, 90.4], [91.8, 92.1, 92.4]
    v = S.beyond_noise(base, new)
    assert v.verdict == "beyond noise" and v.seeds is None
    assert v.diff == pytest.approx(np.mean(new) - np.mean(base))
    assert v.p == pytest.approx(sp.ttest_ind(new, base, equal_var=False).pvalue)
    assert (v.base.n, v.new.n) == (3, 3)
    assert v.base.sd == pytest.approx(np.std(base, ddof=1))
    assert "beyond noise: Δ +2.27 (base n=3, sd 0.603; new n=3, sd 0.3, Welch p" in str(v)
    w = S.beyond_noise(base, [89.5, 90.1, 90.2])
    assert w.verdict == "within noise" and w.seeds > 3 and "seeds a side would settle" in str(w)
    one = S.beyond_noise(base, [92.0])
    assert one.verdict == "not enough runs" and one.p is None and one.new.sd is None
    assert one.seeds is not None  # from the base's spread


def test_one_run_against_one_run_by_the_seed_spread():
    """change_against_noise: seeds 1, 2, 3 (sd 1 exactly), old 2, new 5: t = 3 / √2 = 2.1213
    with 2 degrees of freedom; by hand, the t(2) tail is 1/2 − t / (2√(t² + 2)), so
    p = 1 − t / √(t² + 2) = 1 − 2.1213 / √6.5 = 0.16795."""
    n = S.change_against_noise([1.0, 2.0, 3.0], 2.0, 5.0)
    t = 3 / math.sqrt(2)
    assert n.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-12)
    assert n.p == pytest.approx(0.16795, abs=1e-5)
    assert (n.verdict, n.diff, n.base.n, n.base.sd, n.new.n) == ("within noise", 3.0, 3, 1.0, 1)
    far = S.change_against_noise([1.0, 2.0, 3.0], 2.0, 20.0)
    assert far.verdict == "beyond noise" and far.p == pytest.approx(
        2 * sp.t.sf(18 / math.sqrt(2), 2), rel=1e-12)
    assert S.change_against_noise([1.0], 2.0, 3.0).verdict == "not enough runs"
    flat = S.change_against_noise([4.0, 4.0], 4.0, 4.0)  # no spread, no change
    assert (flat.verdict, flat.p) == ("within noise", 1.0)
    assert S.change_against_noise([4.0, 4.0], 4.0, 4.5).verdict == "beyond noise"
