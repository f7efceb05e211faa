"""report.stats against independent oracles (scipy's and statsmodels' own tests and power
functions) on known numbers, cases worked by hand, and simulations of each verdict procedure
through the real code path (report.claims.decide, verdict and figure_tests; the comparison's
change_against_noise)."""
import math

import numpy as np
import pytest
from scipy import stats as sp
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind

from ablation.report import claims as C
from ablation.report import stats as S


def welch(a, b):
    return S.contrast([(a, b)])


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
    c = welch([1, 2, 3], [4, 6, 8])
    assert (c.diff, c.se ** 2) == (-4.0, pytest.approx(5 / 3, rel=1e-12))
    assert c.df == pytest.approx(50 / 17, rel=1e-12)
    assert S.p_difference(c) == pytest.approx(0.0548, abs=5e-5)


def test_two_pairs_worked_by_hand():
    """Pairs (a1 − b1) and (a2 − b2), every cell of 3 seeds:
    a1 = [1, 2, 3] (mean 2, var 1), b1 = [0, 0, 3] (mean 1, var 3),
    a2 = [5, 6, 7] (mean 6, var 1), b2 = [4, 4, 4] (mean 4, var 0).
    Δ = ((2 − 1) + (6 − 4)) / 2 = 1.5; each cell's v = var / n / k² = var / 12:
    1/12, 3/12, 1/12, 0, so se² = 5/12 and df = (5/12)² / ((1/12)² + (3/12)² + (1/12)²) / 2
    ... = (25/144) / (11/144 / 2) = 50/11 = 4.545454; t = 1.5 / √(5/12) = 2.323790."""
    c = S.contrast([([1, 2, 3], [0, 0, 3]), ([5, 6, 7], [4, 4, 4])])
    assert c.diff == 1.5 and c.se ** 2 == pytest.approx(5 / 12, rel=1e-12)
    assert c.df == pytest.approx(50 / 11, rel=1e-12)
    t = 1.5 / math.sqrt(5 / 12)
    assert t == pytest.approx(2.323790, abs=1e-6)
    assert S.p_difference(c) == pytest.approx(2 * sp.t.sf(t, 50 / 11), rel=1e-12)


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
def test_tests_match_scipy_and_statsmodels(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(90.0, 0.7, 3 + seed)
    b = rng.normal(90.5, 1.5, 2 + 2 * seed)
    s = S.summarize(a)
    lo, hi = sp.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=sp.sem(a))
    assert (s.lo, s.hi) == pytest.approx((lo, hi), rel=1e-12)
    c = welch(a, b)
    assert S.p_difference(c) == pytest.approx(sp.ttest_ind(a, b, equal_var=False).pvalue,
                                              rel=1e-10)
    for m in (0.3, 1.0, 2.5):  # TOST with Welch's df: statsmodels' ttost_ind
        p, _, _ = ttost_ind(a, b, -m, m, usevar="unequal")
        assert S.p_equivalence(c, m) == pytest.approx(p, rel=1e-10)
    fixed = S.contrast([(a, None)], figure=91.0)
    assert S.p_difference(fixed) == pytest.approx(sp.ttest_1samp(a, 91.0).pvalue, rel=1e-10)
    # one run of the same noise: the pooled two-sample t-test of our seeds and that one run
    # (the run adds no df: sp² = s², se = s·√(1/n + 1), df = n − 1)
    one = S.one_run(a, 91.0)
    assert S.p_difference(one) == pytest.approx(
        sp.ttest_ind(a, [91.0], equal_var=True).pvalue, rel=1e-10)
    for x in np.linspace(85.0, 95.0, 41):  # the prediction interval holds x where p >= 0.05
        assert S.predicts(a, x) == (sp.ttest_ind(a, [x], equal_var=True).pvalue >= 0.05)


def test_outside_the_margin():
    """p_outside(Δ, m) is twice the smaller one-sided p of Δ ≤ m and Δ ≥ −m: with a = b + 3,
    sd 1 a cell, Δ = 3, se = √(2/3); margin 1: t = (3 − 1) / se = 2.449490, df 4."""
    a, b = [2.0, 3.0, 4.0], [-1.0, 0.0, 1.0]
    c = welch(a, b)
    t = 2 / math.sqrt(2 / 3)
    assert S.p_outside(c, 1.0) == pytest.approx(2 * sp.t.sf(t, 4), rel=1e-12)
    assert S.p_outside(c, 1e-300) == pytest.approx(S.p_difference(c), rel=1e-9)
    assert S.p_outside(welch(b, a), 1.0) == pytest.approx(S.p_outside(c, 1.0), rel=1e-12)


def test_few_runs_and_no_spread():
    assert S.summarize([]) == S.Summary(0)
    assert S.summarize([99.1]).holds(99.1) is None  # no interval from one run
    c = welch([99.1], [98.0, 98.4])
    assert c.diff == pytest.approx(0.9) and c.se is None and S.p_difference(c) is None
    assert welch([], [1.0, 2.0]).diff is None
    assert S.p_difference(welch([3.0, 3.0], [3.0, 3.0])) == 1.0
    assert S.p_difference(welch([3.0, 3.0], [4.0, 4.0])) == 0.0
    assert S.p_equivalence(welch([3.0, 3.0], [3.5, 3.5]), 1.0) == 0.0  # |0.5| < 1 exactly
    assert S.p_equivalence(welch([3.0, 3.0], [4.5, 4.5]), 1.0) == 1.0
    assert S.one_run([2.0], 1.0).se is None


@pytest.mark.parametrize("sd,effect,level", [(0.5, 1.0, 0.05), (0.8, 1.0, 0.05 / 8),
                                             (30000.0, 60000.0, 0.05 / 2)])
def test_planned_seeds_match_statsmodels(sd, effect, level):
    """The seeds a row for 80 % power of the two-sided test at a true difference `effect`:
    statsmodels' TTestIndPower (pooled t, df 2n − 2, as the plan with equal spreads) and
    TTestPower (one sample against a figure), rounded up."""
    n = S.seeds_for_power(lambda n: S.power_difference(n, sd, effect, level))
    want = TTestIndPower().solve_power(effect_size=effect / sd, alpha=level, power=0.8)
    assert n == max(2, math.ceil(want))
    assert S.power_difference(n, sd, effect, level) == pytest.approx(
        TTestIndPower().power(effect / sd, n, level), rel=1e-6)
    one = S.seeds_for_power(lambda n: S.power_difference(n, sd, effect, level, one_sample=True))
    assert one == max(2, math.ceil(TTestPower().solve_power(effect_size=effect / sd,
                                                            alpha=level, power=0.8)))
    assert S.seeds_for_power(lambda n: S.power_difference(n, sd, effect / 100, level),
                             cap=30) is None


@pytest.mark.parametrize("sd,distance,level", [(0.5, 1.0, 0.05), (0.8, 1.0, 0.05 / 8)])
def test_one_sided_tests_and_their_power_match_scipy_and_statsmodels(sd, distance, level):
    """p_below / p_above: scipy's one-sided Welch test of the shifted sample; their planned
    seeds: statsmodels' one-sided TTestIndPower (alternative='larger')."""
    a, b, bound = [90.1, 90.9, 91.4], [89.0, 89.8, 89.3, 90.2], 1.0
    c = welch(a, b)
    shifted = np.asarray(a) - bound
    assert S.p_below(c, bound) == pytest.approx(
        sp.ttest_ind(shifted, b, equal_var=False, alternative="less").pvalue, rel=1e-10)
    assert S.p_above(c, bound) == pytest.approx(
        sp.ttest_ind(shifted, b, equal_var=False, alternative="greater").pvalue, rel=1e-10)
    n = S.seeds_for_power(lambda n: S.power_one_sided(n, sd, distance, level))
    want = TTestIndPower().solve_power(effect_size=distance / sd, alpha=level, power=0.8,
                                       alternative="larger")
    assert n == max(2, math.ceil(want))
    assert S.power_one_sided(n, sd, distance, level) == pytest.approx(
        TTestIndPower().power(distance / sd, n, level, alternative="larger"), rel=1e-6)


def test_one_run_against_one_run_by_the_seed_spread():
    """change_against_noise: seeds 1, 2, 3 (sd 1 exactly), old 2, new 5: t = 3 / √2 = 2.1213
    with 2 degrees of freedom; by hand, the t(2) tail is 1/2 − t / (2√(t² + 2)), so
    p = 1 − t / √(t² + 2) = 1 − 2.1213 / √6.5 = 0.16795."""
    n = S.change_against_noise([1.0, 2.0, 3.0], 2.0, 5.0)
    t = 3 / math.sqrt(2)
    assert n.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-12)
    assert n.p == pytest.approx(0.16795, abs=1e-5)
    assert (n.verdict, n.diff, n.base.n, n.base.sd) == ("within noise", 3.0, 3, 1.0)
    far = S.change_against_noise([1.0, 2.0, 3.0], 2.0, 20.0)
    assert far.verdict == "beyond noise" and far.p == pytest.approx(
        2 * sp.t.sf(18 / math.sqrt(2), 2), rel=1e-12)
    assert S.change_against_noise([1.0], 2.0, 3.0).verdict == "not enough runs"
    flat = S.change_against_noise([4.0, 4.0], 4.0, 4.0)  # no spread, no change
    assert (flat.verdict, flat.p) == ("within noise", 1.0)
    assert S.change_against_noise([4.0, 4.0], 4.0, 4.5).verdict == "beyond noise"


# ---- simulations: each verdict procedure through claims.decide / claims.verdict ----------

REPS = 4000
BOUND = 0.05 + 3 * math.sqrt(0.05 * 0.95 / REPS)  # 5 % plus three Monte Carlo errors


def rate(claim, draw, want, reps=REPS, seed=0):
    """How often the claim's verdict on `draw(rng)` (pairs of samples, or a figure's sample
    and the figure) is one of `want`, as the report decides it (one claim: Holm p = p)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(reps):
        c = draw(rng)
        p, outcome = C.decide(claim, c)
        hits += C.verdict(outcome, p) in want
    return hits / reps


def cells(rng, sds, shift=0.0, n=3):
    """k pairs of n seeds a row; row b of each pair is `shift` below row a in truth, each row
    with its own spread and mean (the settings differ in more than the factor)."""
    return S.contrast([(rng.normal(10 * i + shift, sa, n), rng.normal(10 * i, sb, n))
                       for i, (sa, sb) in enumerate(sds)])


@pytest.mark.parametrize("sds", [[(1.0, 1.0)], [(0.5, 1.5)], [(0.4, 0.9), (1.2, 0.6), (0.8, 0.8)]])
def test_a_directional_claim_rarely_decides_without_a_difference(sds):
    claim = {"expect": "higher", "margin": 1.0}
    r = rate(claim, lambda rng: cells(rng, sds), {"supported", "contradicted"})
    assert r <= BOUND, r


def test_a_claim_against_a_threshold_and_the_study_run_rarely_decide_without_a_difference():
    claim = {"expect": "higher", "margin": 0.1, "than": 99.0}
    r = rate(claim, lambda rng: S.contrast([(rng.normal(99.0, 0.1, 3), None)], figure=99.0),
             {"supported", "contradicted"})
    assert r <= BOUND, r
    # the study's figure: one run of the same noise as our seeds, through the report's own
    # figure_tests (one line a draw: Holm over one line is the p itself)
    rng, beyond = np.random.default_rng(1), 0
    for _ in range(REPS):
        line = ("r", "acc", list(rng.normal(90.0, 0.8, 3)), float(rng.normal(90.0, 0.8)), ".2f")
        f, = C.figure_tests([line])
        beyond += f.verdict == "beyond noise"
    assert beyond / REPS <= BOUND, beyond / REPS


def test_a_pull_request_rarely_moves_beyond_noise_without_a_change():
    """compare's judgement (change_against_noise): the base's run and the target's run are two
    more runs of the configuration whose seeds are on record, none of them changed."""
    rng, beyond = np.random.default_rng(3), 0
    for _ in range(REPS):
        seeds = rng.normal(99.0, 0.2, 3)
        old, new = rng.normal(99.0, 0.2, 2)
        beyond += S.change_against_noise(seeds, old, new).verdict == "beyond noise"
    assert beyond / REPS <= BOUND, beyond / REPS


@pytest.mark.parametrize("expect,side", [("not higher", 1), ("not lower", -1)])
@pytest.mark.parametrize("sds", [[(0.6, 0.6)], [(0.4, 0.9), (1.2, 0.6)]])
def test_not_higher_is_rarely_supported_at_its_margin_and_rarely_contradicted_at_zero(
        expect, side, sds):
    """Non-superiority: where the true Δ lies exactly at the bound (+margin; not lower:
    −margin) the claim is false by its own terms and `supported` is the false positive; where
    there is no difference `contradicted` is."""
    claim = {"expect": expect, "margin": 1.0}
    at_bound = rate(claim, lambda rng: cells(rng, sds, shift=side * 1.0), {"supported"})
    assert at_bound <= BOUND, at_bound
    at_zero = rate(claim, lambda rng: cells(rng, sds), {"contradicted"}, seed=4)
    assert at_zero <= BOUND, at_zero


@pytest.mark.parametrize("sds", [[(0.6, 0.6)], [(0.4, 0.9), (1.2, 0.6)]])
def test_same_is_rarely_equivalent_at_the_margin_and_rarely_different_at_zero(sds):
    claim = {"expect": "same", "margin": 1.0}
    at_margin = rate(claim, lambda rng: cells(rng, sds, shift=1.0, n=6), {"equivalent"})
    assert at_margin <= BOUND, at_margin
    at_zero = rate(claim, lambda rng: cells(rng, sds, n=6), {"different"}, seed=2)
    assert at_zero <= BOUND, at_zero


def test_the_planned_seeds_reach_the_planned_power():
    """Where the plan says n seeds a row, simulated runs of n seeds reach 80 % (less Monte
    Carlo error): for `same` and `not higher` at a true difference of 0, for a directional
    claim at the margin."""
    sd, level = 0.6, 0.05
    for claim, shift, want in (({"expect": "same", "margin": 1.0}, 0.0, {"equivalent"}),
                               ({"expect": "higher", "margin": 1.0}, 1.0, {"supported"}),
                               ({"expect": "not higher", "margin": 1.0}, 0.0, {"supported"})):
        n = C.plan_seeds(claim, [("a", "b")], sd, level)
        assert 2 < n < 30
        got = rate(claim, lambda rng: cells(rng, [(sd, sd)], shift=shift, n=n), want, reps=2000)
        assert got >= 0.8 - 3 * math.sqrt(0.16 / 2000), (claim, n, got)
        fewer = rate(claim, lambda rng: cells(rng, [(sd, sd)], shift=shift, n=n - 2), want,
                     reps=2000)
        assert fewer < got  # and fewer seeds fall short of it
