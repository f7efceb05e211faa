"""Seed statistics, one place for all of them: the reports' 95 % intervals, the tests behind
their Conclusions, and the judgement of a change against seed noise (`beyond_noise`, for
comparing a pull request's runs with main's).

    summarize(values)             n, mean, sample std and the 95 % t-interval
    compare(a, b) / compare(a, figure=x)
                                  Welch's t-test (scipy.stats.ttest_ind, equal_var=False), or a
                                  one-sample t-test against a single figure; two-sided
    holm(pvalues)                 Holm's step-down adjusted p-values
    seeds_needed(comparison, level)
                                  seeds per side at which the observed difference would reach
                                  p < level (formula in its docstring)
    beyond_noise(base, new)       a verdict on a change between two sets of seeds, with the
                                  spread and n it used
    change_against_noise(seeds, old, new)
                                  the same for one run against one run (a pull request's
                                  comparison), the spread taken from recorded seeds

Every value is one run (one seed); every test is two-sided.
"""
import dataclasses
import math
from typing import NamedTuple

import numpy as np
from scipy import stats

ALPHA = 0.05  # the significance level of every test here (before Holm)
LEVEL = 0.95  # the confidence of every interval here
MAX_SEEDS = 1000  # seeds_needed gives up beyond this many a side


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


class Comparison(NamedTuple):
    """Sample a against sample b, or against a single `figure` (b None). diff: mean(a) minus
    mean(b) or the figure, None where a side has no run; p: two-sided, None where a side has
    under 2 runs."""
    a: Summary
    b: Summary | None
    figure: float | None
    diff: float | None
    p: float | None


def compare(a, b=None, figure=None):
    """Welch's t-test of samples a and b (scipy.stats.ttest_ind, equal_var=False), or a
    one-sample t-test of a against `figure` (scipy.stats.ttest_1samp). Samples without any
    spread (every seed the same value) give p 0 where the means differ, 1 where they agree."""
    a = [float(v) for v in a]
    sa = summarize(a)
    if figure is not None:
        diff = None if sa.n == 0 else sa.mean - figure
        if sa.n < 2:
            return Comparison(sa, None, figure, diff, None)
        if np.ptp(a) == 0:
            return Comparison(sa, None, figure, diff, 0.0 if a[0] != figure else 1.0)
        return Comparison(sa, None, figure, diff, float(stats.ttest_1samp(a, figure).pvalue))
    b = [float(v) for v in b]
    sb = summarize(b)
    diff = None if not (sa.n and sb.n) else sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Comparison(sa, sb, None, diff, None)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return Comparison(sa, sb, None, diff, 0.0 if a[0] != b[0] else 1.0)
    return Comparison(sa, sb, None, diff,
                      float(stats.ttest_ind(a, b, equal_var=False).pvalue))


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


def welch_p(diff, sd_a, sd_b, n):
    """Two-sided p of Welch's test with n runs a side at these means and sample stds."""
    va, vb = sd_a ** 2, sd_b ** 2
    if va + vb == 0:
        return 0.0 if diff else 1.0
    t = abs(diff) / math.sqrt((va + vb) / n)
    df = (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)
    return float(2 * stats.t.sf(t, df))


def one_sample_p(diff, sd, n):
    """Two-sided p of a one-sample t-test with n runs at this difference and sample std."""
    if sd == 0:
        return 0.0 if diff else 1.0
    return float(2 * stats.t.sf(abs(diff) / (sd / math.sqrt(n)), n - 1))


def seeds_needed(c, level=ALPHA, cap=MAX_SEEDS):
    """The fewest runs n a side (n >= 2) at which the same test, at the observed difference d
    and spread, would give p < level; None where none up to `cap` would (or d is 0). Welch,
    with sd_a, sd_b the sample stds of the two sides:
        t = |d| / √((sd_a² + sd_b²) / n),  df = (n - 1)(sd_a² + sd_b²)² / (sd_a⁴ + sd_b⁴)
    (Welch-Satterthwaite with n runs a side); against a figure: t = |d| / (sd / √n), df = n - 1;
    p = 2 · P(T_df > t). p falls as n grows, so n is found by bisection. A side with under 2
    runs takes the other side's sd; with no sd at all (or no run on a side) None."""
    if c.diff is None or c.diff == 0:
        return None
    if c.b is None:
        if c.a.sd is None:
            return None

        def p(n):
            return one_sample_p(c.diff, c.a.sd, n)
    else:
        sd_a, sd_b = (c.a.sd if c.a.sd is not None else c.b.sd), \
            (c.b.sd if c.b.sd is not None else c.a.sd)
        if sd_a is None:
            return None

        def p(n):
            return welch_p(c.diff, sd_a, sd_b, n)
    if p(cap) >= level:
        return None
    lo, hi = 2, cap  # p(hi) < level throughout
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if p(mid) < level else (mid + 1, hi)
    return lo


@dataclasses.dataclass(frozen=True)
class Noise:
    """beyond_noise's answer. verdict: 'beyond noise' (p < alpha), 'within noise', or 'not
    enough runs' (a side has under 2); diff = mean(new) - mean(base); base and new: the
    Summary (n, mean, sd, interval) of each side; seeds: runs a side at which the observed
    difference would reach p < alpha (seeds_needed), None where it already does or cannot."""
    verdict: str
    diff: float | None
    p: float | None
    base: Summary
    new: Summary
    seeds: int | None

    def __str__(self):
        def side(s):
            return f"n={s.n}" + (f", sd {s.sd:.3g}" if s.sd is not None else "")
        head = self.verdict + ("" if self.diff is None else f": Δ {self.diff:+.3g}")
        tail = "" if self.p is None else f", Welch p {self.p:.2g}"
        more = f"; about {self.seeds} seeds a side would settle it" if self.seeds else ""
        return f"{head} (base {side(self.base)}; new {side(self.new)}{tail}){more}"


def beyond_noise(base_values, new_values, alpha=ALPHA):
    """Whether new runs differ from base runs by more than seed noise: Welch's t-test of the
    two samples at `alpha`, with the spread and n each side had."""
    c = compare(new_values, base_values)
    if c.p is None:
        verdict = "not enough runs"
    else:
        verdict = "beyond noise" if c.p < alpha else "within noise"
    seeds = None if verdict == "beyond noise" else seeds_needed(c, alpha)
    return Noise(verdict, c.diff, c.p, c.b, c.a, seeds)


def change_against_noise(seeds, old, new, alpha=ALPHA):
    """Whether one run's `new` value differs from one run's `old` by more than seed noise,
    the noise estimated from `seeds` (runs of one configuration that differ in their seed
    only). Two single runs of one configuration differ by a normal variable of sd σ·√2; with
    s, the seeds' sample std (n of them), t = (new − old) / (s·√2) has n − 1 degrees of
    freedom (two-sided). A Noise whose `base` summarizes the seeds and `new` the one new run;
    'not enough runs' under 2 seeds."""
    s = summarize(seeds)
    diff = float(new) - float(old)
    one = summarize([new])
    if s.n < 2:
        return Noise("not enough runs", diff, None, s, one, None)
    if s.sd == 0:  # every seed the same: any change beyond float rounding is beyond noise
        p = 0.0 if abs(diff) > 1e-9 * max(1.0, abs(float(old))) else 1.0
    else:
        p = float(2 * stats.t.sf(abs(diff) / (s.sd * math.sqrt(2)), s.n - 1))
    return Noise("beyond noise" if p < alpha else "within noise", diff, p, s, one, None)
