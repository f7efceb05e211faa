"""Seed statistics, one place for all of them: the reports' 95 % intervals, the tests behind
their Conclusions, the study's single figures set against our seeds, the judgement of a change
against seed noise (a pull request's comparison), and the seeds a test needs.

    summarize(values)             n, mean, sample std and the 95 % t-interval
    contrast(pairs)               the mean over k matched pairs of rows of (row a − row b), each
                                  row's seeds its replicates: Welch's standard error and
                                  Welch–Satterthwaite degrees of freedom (k = 1: Welch's test)
    contrast(cells, figure=x)     the mean of the rows' means against a fixed threshold x
                                  (a one-sample t-test for one row)
    one_run(values, x)            our seeds against one run x of the same noise (the study's
                                  figure): t = Δ / (s·√(1 + 1/n)), df n − 1
    predicts(values, x)           whether x lies in the 95 % prediction interval of one more run
    p_difference(c)               two-sided p of "no difference"
    p_equivalence(c, m)           TOST: the larger of the two one-sided p of |Δ| ≥ m
    p_outside(c, m)               two-sided p of |Δ| ≤ m (the difference lies beyond the margin)
    p_below(c, x), p_above(c, x)  one-sided p of Δ ≥ x (rejected: Δ < x) and of Δ ≤ x
    holm(pvalues)                 Holm's step-down adjusted p-values
    power_difference / power_one_sided / power_equivalence, seeds_for_power
                                  planned power: the seeds a row at which a test has 80 % power
                                  at a stated true difference, under a stated spread
    change_against_noise(seeds, old, new)
                                  one run against one run (t = Δ / (s·√2)), the spread taken
                                  from recorded seeds

Why these and not statsmodels' `ttost_ind` / `TTestIndPower`: a claim over k matched pairs of
rows tests a contrast of 2k cells, which those two-sample functions do not take; for k = 1 the
contrast is exactly Welch's test, and the tests check that against scipy and statsmodels.
Every value is one run (one seed).
"""
import math
from typing import NamedTuple

import numpy as np
from scipy import stats

ALPHA = 0.05  # the significance level of every test here (before Holm)
LEVEL = 0.95  # the confidence of every interval here
POWER = 0.8  # the power a plan of seeds aims at
MAX_SEEDS = 1000  # seeds_for_power gives up beyond this many a row


class Summary(NamedTuple):
    """Runs of one sample: n, mean, sample std (ddof 1) and the t-interval at LEVEL,
    mean ± t(0.975, n - 1) · sd / √n; sd, lo and hi are None under 2 runs."""
    n: int
    mean: float | None = None
    sd: float | None = None
    lo: float | None = None
    hi: float | None = None

    def holds(self, x):
        """Whether x lies inside the interval (None without one)."""
        return None if self.lo is None else self.lo <= x <= self.hi


def summarize(values, level=LEVEL):
    x = np.asarray(list(values), dtype=float)
    if len(x) == 0:
        return Summary(0)
    mean = float(x.mean())
    if len(x) < 2:
        return Summary(1, mean)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return Summary(len(x), mean, sd, mean - half, mean + half)


class Contrast(NamedTuple):
    """A difference to test: diff (the estimate; None where a cell has no run), se (its
    standard error; None where a cell has under 2 runs), df, and the cells it was built from:
    ((Summary a, Summary b or None), ...)."""
    diff: float | None
    se: float | None
    df: float | None
    cells: tuple


def contrast(pairs, figure=None):
    """The mean over the k pairs (a values, b values) of mean(a) − mean(b): a Welch-type
    contrast, each cell's variance its own, se² = Σ s²/n / k², df by Welch–Satterthwaite,
    (Σ v)² / Σ v² / (n − 1) with v = s² / (n k²). With `figure`, pairs are (a values, None) and
    the difference is the mean of the a means minus the figure (a fixed number, no noise)."""
    cells = tuple((summarize(a), None if figure is not None else summarize(b)) for a, b in pairs)
    sums = [s for cell in cells for s in cell if s is not None]
    if not cells or any(s.n == 0 for s in sums):
        return Contrast(None, None, None, cells)
    k = len(cells)
    diff = sum(a.mean - (figure if b is None else b.mean) for a, b in cells) / k
    if any(s.n < 2 for s in sums):
        return Contrast(diff, None, None, cells)
    v = [s.sd ** 2 / s.n / k ** 2 for s in sums]
    se = math.sqrt(sum(v))
    df = sum(v) ** 2 / sum(x ** 2 / (s.n - 1) for x, s in zip(v, sums)) if se else math.inf
    return Contrast(diff, se, df, cells)


def one_run(values, figure):
    """Our seeds against one run of the same setting (the study's figure), taken as one draw
    from our spread: a new run differs from our mean by sd·√(1 + 1/n), t with n − 1 df (the
    prediction interval's test)."""
    s = summarize(values)
    cells = ((s, None),)
    if s.n == 0:
        return Contrast(None, None, None, cells)
    if s.n < 2:
        return Contrast(s.mean - figure, None, None, cells)
    return Contrast(s.mean - figure, s.sd * math.sqrt(1 + 1 / s.n), s.n - 1, cells)


def predicts(values, x, level=LEVEL):
    """Whether x lies in the `level` prediction interval of one more run of these seeds,
    mean ± t((1 + level) / 2, n − 1) · s·√(1 + 1/n) (None under 2 seeds): the prediction
    test's p >= 1 − level."""
    c = one_run(values, x)
    if c.se is None:
        return None
    return abs(c.diff) <= float(stats.t.ppf((1 + level) / 2, c.df)) * c.se


def _exact(c, holds):
    """p where the spread is 0 (every seed the same): 0 where the hypothesis under test is
    false at the observed difference, 1 where it holds."""
    return 1.0 if holds(c.diff) else 0.0


def p_difference(c):
    """Two-sided p of "no difference" (Δ = 0); None without a spread."""
    if c.se is None:
        return None
    if c.se == 0:
        return _exact(c, lambda d: d == 0)
    return float(2 * stats.t.sf(abs(c.diff) / c.se, c.df))


def p_equivalence(c, margin):
    """Two one-sided tests (TOST) of |Δ| ≥ margin: the larger of P(T > (Δ + m) / se) and
    P(T < (Δ − m) / se); below alpha, -m < Δ < m at that level."""
    if c.se is None:
        return None
    if c.se == 0:
        return _exact(c, lambda d: abs(d) >= margin)
    lower = stats.t.sf((c.diff + margin) / c.se, c.df)
    upper = stats.t.cdf((c.diff - margin) / c.se, c.df)
    return float(max(lower, upper))


def p_outside(c, margin):
    """Two-sided p of |Δ| ≤ margin (the difference lies beyond the margin, either way): twice
    the smaller one-sided p of Δ ≤ m and Δ ≥ −m, capped at 1; margin 0 gives p_difference."""
    if c.se is None:
        return None
    if c.se == 0:
        return _exact(c, lambda d: abs(d) <= margin)
    above = stats.t.sf((c.diff - margin) / c.se, c.df)
    below = stats.t.cdf((c.diff + margin) / c.se, c.df)
    return float(min(1.0, 2 * min(above, below)))


def p_below(c, bound):
    """One-sided p of Δ ≥ bound: below alpha, Δ < bound at that level (a non-superiority
    test where bound is +margin); None without a spread."""
    if c.se is None:
        return None
    if c.se == 0:
        return _exact(c, lambda d: d >= bound)
    return float(stats.t.cdf((c.diff - bound) / c.se, c.df))


def p_above(c, bound):
    """One-sided p of Δ ≤ bound: below alpha, Δ > bound at that level; None without a
    spread. p_above(c, x) + p_below(c, x) = 1 where there is a spread."""
    if c.se is None:
        return None
    if c.se == 0:
        return _exact(c, lambda d: d <= bound)
    return float(stats.t.sf((c.diff - bound) / c.se, c.df))


def holm(pvalues):
    """Holm's adjusted p-values, in the order given: sorted ascending, the k-th (k from 0) is
    multiplied by (m - k), kept non-decreasing along the order and capped at 1. None (no test)
    stays None and does not count in m. Reject at adjusted p < alpha."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out, top = [None] * len(pvalues), 0.0
    for k, i in enumerate(order):
        top = max(top, min(1.0, (len(order) - k) * pvalues[i]))
        out[i] = top
    return out


def pooled_sd(samples):
    """The pooled sample std of several samples (each with 2 or more values counts):
    √(Σ (n − 1) s² / Σ (n − 1)); None where none has 2."""
    used = [summarize(s) for s in samples]
    used = [s for s in used if s.n >= 2]
    if not used:
        return None
    return math.sqrt(sum((s.n - 1) * s.sd ** 2 for s in used) / sum(s.n - 1 for s in used))


def _se_df(n, sd, k, one_sample):
    """The standard error and df of a planned contrast: k pairs (or k rows against a fixed
    figure) of n seeds a row, every row of spread sd."""
    if one_sample:
        return sd / math.sqrt(n * k), k * (n - 1)
    return sd * math.sqrt(2 / (n * k)), 2 * k * (n - 1)


def _sf(crit, df, ncp):
    """P(T' > crit), T' noncentral t; scipy gives NaN far in a tail (large df and ncp), where
    the normal approximation P(Z > crit − ncp) is exact to many digits."""
    p = float(stats.nct.sf(crit, df, ncp))
    return p if math.isfinite(p) else float(stats.norm.sf(crit - ncp))


def power_difference(n, sd, effect, level=ALPHA, k=1, one_sample=False):
    """The power of the two-sided test of Δ = 0 at level `level` where the true difference is
    `effect`: P(|T'| > t(1 − level/2, df)), T' noncentral t with ncp effect / se."""
    se, df = _se_df(n, sd, k, one_sample)
    crit = stats.t.ppf(1 - level / 2, df)
    ncp = effect / se
    return _sf(crit, df, ncp) + _sf(crit, df, -ncp)


def power_one_sided(n, sd, distance, level=ALPHA, k=1, one_sample=False):
    """The power of a one-sided test at level `level` where the true difference lies
    `distance` beyond its bound, on the side the test looks for: P(T' > t(1 − level, df)),
    T' noncentral t with ncp distance / se."""
    se, df = _se_df(n, sd, k, one_sample)
    return _sf(stats.t.ppf(1 - level, df), df, distance / se)


def power_equivalence(n, sd, margin, level=ALPHA, k=1, true_diff=0.0):
    """The power of TOST with this margin where the true difference is `true_diff`, by the
    usual bound P(T'₁ > t) + P(T'₂ > t) − 1 with ncp (m ∓ Δ) / se (a lower bound: the seeds
    it plans are enough)."""
    se, df = _se_df(n, sd, k, False)
    crit = stats.t.ppf(1 - level, df)
    p = _sf(crit, df, (margin - true_diff) / se) + _sf(crit, df, (margin + true_diff) / se) - 1
    return max(0.0, p)


def seeds_for_power(power, target=POWER, cap=MAX_SEEDS):
    """The fewest seeds n a row (n >= 2) at which power(n) >= target (power rises with n; found
    by bisection); None where even `cap` seeds fall short."""
    if power(cap) < target:
        return None
    lo, hi = 2, cap
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power(mid) >= target else (mid + 1, hi)
    return lo


class Noise(NamedTuple):
    """change_against_noise's answer. verdict: 'beyond noise' (p < alpha), 'within noise', or
    'not enough runs' (under 2 seeds); diff = new − old; base: the seeds' Summary."""
    verdict: str
    diff: float
    p: float | None
    base: Summary


def change_against_noise(seeds, old, new, alpha=ALPHA):
    """Whether one run's `new` value differs from one run's `old` by more than seed noise,
    the noise estimated from `seeds` (runs of one configuration that differ in their seed
    only). Two single runs of one configuration differ by a normal variable of sd σ·√2; with
    s, the seeds' sample std (n of them), t = (new − old) / (s·√2) has n − 1 degrees of
    freedom (two-sided)."""
    s = summarize(seeds)
    diff = float(new) - float(old)
    if s.n < 2:
        return Noise("not enough runs", diff, None, s)
    if s.sd == 0:  # every seed the same: any change beyond float rounding is beyond noise
        p = 0.0 if abs(diff) > 1e-9 * max(1.0, abs(float(old))) else 1.0
    else:
        p = float(2 * stats.t.sf(abs(diff) / (s.sd * math.sqrt(2)), s.n - 1))
    return Noise("beyond noise" if p < alpha else "within noise", diff, p, s)
