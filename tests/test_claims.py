"""The grid file's claims (grid.schema) and the report's Conclusions (report.claims): checked
like every other key, tested on the recorded runs, verdicts computed, never typed."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sp
from statsmodels.stats.power import TTestIndPower
from statsmodels.stats.weightstats import ttost_ind

from ablation.core.cli import UserError
from ablation.grid import schema as G
from ablation.record.run import Run
from ablation.report import claims, command
from ablation.report import stats as S
from ablation.report import tables as report

from .helpers import PARAMS, ROOT

METRICS = "metrics/resnet/mnist/resnet18.json"
GRID = ("name: c\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
        "columns:\n  - {label: acc, metric: test_accuracy, fmt: .2f}\n"
        "extra:\n  - {label: img/s, metric: images_per_s, fmt: .0f}\n"
        "rows:\n  - {id: a, set: {train.lr: 0.01}, study: {acc: 92.0}}\n"
        "  - {id: b, set: {train.lr: 0.001}, study: {acc: 91.0}}\n"
        "  - {id: c, set: {train.lr: 0.0001}}\n"
        "  - {id: d, set: {train.lr: 0.0001, train.batch_size: 32}}\n")
CLAIMS = ("claims:\n"
          "  - {claim: a beats b, rows: [a], vs: [b], factor: train.lr, column: acc, "
          "expect: higher, margin: 0.5}\n"
          "  - {claim: c beats a, rows: [c], vs: [a], factor: train.lr, column: acc, "
          "expect: higher, margin: 0.5}\n"
          "  - {claim: d matches a, rows: [d], vs: [a], factor: [train.lr, train.batch_size], "
          "column: acc, expect: same, margin: 1.0}\n"
          "  - {claim: a above 90, rows: [a], than: 90, column: acc, expect: higher, "
          "margin: 0.5}\n")


def load(tmp_path, text):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    return G.load(str(p), params_path=PARAMS)


def runs_of(g, accs):
    """{name: Run} with one finished run per value of accs {row id: [acc, ...]}, seeds 0..."""
    params = {r["id"]: r["params"] for r in g["rows"]}
    return {f"c-{rid}-s{s}": Run.from_dict(f"c-{rid}-s{s}", {
        "state": "success", "rev": None, "timestamp": f"2026-01-01T1{s}:0{i}:00",
        "data": {"params": {"params.yaml": {"data": params[rid]}},
                 "metrics": {METRICS: {"data": {"test_accuracy": v, "images_per_s": 100.0}}}}})
        for i, (rid, vals) in enumerate(accs.items()) for s, v in enumerate(vals)}


def conclusions(g, runs):
    """{claim text: cells} of the Conclusions' claims table, and the Markdown."""
    _, frame = report.build(g, runs)
    md = claims.section(g, frame)
    rows = [line.strip("| ").split(" | ") for line in md.split("## Conclusions")[1]
            .split("\n\n")[1].splitlines()[2:]]
    return {r[0]: r for r in rows}, md


@pytest.mark.parametrize("claim,expect", [
    ("{claim: x, rows: [zz], vs: [a], column: acc, expect: higher}",
     "claims[1].rows = ['zz']: allowed: a non-empty list of distinct row ids of the grid: "
     "a, b, c, d"),
    ("{claim: x, rows: [a], vs: [b, q], column: acc, expect: higher}",
     "claims[1].vs = ['b', 'q']: allowed: a non-empty list of distinct row ids"),
    ("{claim: x, rows: [a], vs: [b], column: accuracy, expect: higher}",
     "claims[1].column = 'accuracy': allowed: one of acc, img/s"),
    ("{claim: x, rows: [a], vs: [b], column: acc, expect: better}",
     "claims[1].expect = 'better': allowed: one of higher, lower, same, not higher, not lower"),
    ("{claim: x, rows: [a], column: acc, expect: higher}", "claims[1].claim = 'x': give exactly "
                                                           "one of 'vs' (row ids) or 'than'"),
    ("{claim: x, rows: [a], vs: [b], than: 3, column: acc, expect: higher}", "exactly one of"),
    ("{claim: x, rows: [a, b], vs: [b], column: acc, expect: higher}",
     "claims[1].vs = ['b']: row b is on both sides"),
    ("{claim: x, rows: [a], than: .nan, column: acc, expect: higher}",
     "claims[1].than = nan: allowed: a number"),
    ("{claim: x, rows: [a], vs: [b], column: acc, expect: higher, verdict: supported}",
     "unknown key 'claims[1].verdict' (allowed keys: claim, rows, vs, than, column, expect, "
     "factor, margin)"),
    ("{rows: [a], vs: [b], column: acc, expect: higher}", "missing key 'claims[1].claim'"),
    ("{claim: x, rows: [a], vs: [b], column: acc, expect: higher}",
     "claims[1].claim = 'x': name the param(s) it tests in 'factor' (allowed: a list of "),
    ("{claim: x, rows: [a], vs: [b], factor: train.lr, column: acc, expect: same}",
     "claims[1].claim = 'x': expect: same needs a margin (allowed: a number > 0, the largest "
     "difference in acc that still counts as the same)"),
    ("{claim: x, rows: [a], vs: [b], factor: train.lr, column: acc, expect: not higher}",
     "claims[1].claim = 'x': expect: not higher needs a margin (allowed: a number > 0, the "
     "largest excess in acc that still counts as not higher)"),
    ("{claim: x, rows: [a], vs: [b], factor: train.bogus, column: acc, expect: higher}",
     "claims[1].factor = 'train.bogus': allowed: a param or a list of distinct params of: "),
    ("{claim: x, rows: [a], vs: [b], factor: train.lr, column: acc, expect: same, margin: -1}",
     "claims[1].margin = -1: allowed: a number > 0, in the column's units"),
    ("{claim: x, rows: [a], than: 9, factor: train.lr, column: acc, expect: higher}",
     "claims[1].claim = 'x': 'factor' goes with 'vs' (rows against rows), not 'than'"),
])
def test_malformed_claim_is_one_clear_error(tmp_path, claim, expect):
    with pytest.raises(UserError) as e:
        load(tmp_path, GRID + f"claims:\n  - {claim}\n")
    assert str(e.value).startswith(str(tmp_path / "g.yaml")) and expect in str(e.value)


def test_bad_claim_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(GRID + "claims:\n  - {claim: x, rows: [a], vs: [b], factor: train.lr, "
                        "column: acc, expect: same}\n")
    r = subprocess.run([sys.executable, "-m", "ablation.report", str(p), "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{p}: claims[1].claim = 'x': expect: same needs a margin" in r.stderr
    assert not (tmp_path / "out").exists()


def p_cell(p, ph):
    return f"{format(p, '.2g')} ({format(ph, '.2g')})"


def test_verdicts_come_from_the_runs(tmp_path):
    """Runs whose answers are known: a (~91.0) clearly above b (~89.0): supported; c (~88.0)
    "beats" a: contradicted; d, another lr and batch size, within 0.1 of a with a margin of 1:
    equivalent; a above 90 by 1.0 with sd 0.2: supported. p from scipy and statsmodels, Holm
    over the four."""
    g = load(tmp_path, GRID + CLAIMS)
    accs = {"a": [90.8, 91.0, 91.2], "b": [88.9, 89.0, 89.2], "c": [87.9, 88.0, 88.2],
            "d": [91.0, 91.1, 90.9]}
    rows, md = conclusions(g, runs_of(g, accs))
    pvals = [sp.ttest_ind(accs["a"], accs["b"], equal_var=False).pvalue,
             sp.ttest_ind(accs["c"], accs["a"], equal_var=False).pvalue,
             ttost_ind(accs["d"], accs["a"], -1.0, 1.0, usevar="unequal")[0],
             sp.ttest_1samp(accs["a"], 90).pvalue]
    ph = sm_holm(pvals)
    assert rows["a beats b"][1:6] == ["a (3) vs b (3); lr: higher, margin 0.5", "acc",
                                      "91.00 vs 89.03", "+1.97", p_cell(pvals[0], ph[0])]
    assert [rows[k][6] for k in ("a beats b", "c beats a", "d matches a", "a above 90")] == [
        "**supported**", "**contradicted**", "**equivalent**", "**supported**"]
    assert rows["d matches a"][1] == "d (3) vs a (3); lr, batch_size: same, margin 1"
    assert rows["d matches a"][5] == p_cell(pvals[2], ph[2])
    assert rows["a above 90"][1:6] == ["a (3): higher than 90, margin 0.5", "acc",
                                       "91.00 vs 90", "+1.00", p_cell(pvals[3], ph[3])]
    assert all(rows[k][7] == "—" for k in rows)  # decided: nothing to settle
    far = dict(accs, d=[93.0, 93.1, 92.9])  # 2 points from a, margin 1: different
    rows, _ = conclusions(g, runs_of(g, far))
    assert rows["d matches a"][6] == "**different**"
    p_out = 2 * sp.t.sf((2.0 - 1.0) / math.sqrt(0.01 / 3 + 0.04 / 3),
                        sp.ttest_ind(far["d"], far["a"], equal_var=False).df)
    assert rows["d matches a"][5].startswith(format(p_out, ".2g") + " (")


NOT_HIGHER = ("claims:\n"
              "  - {claim: b not above a, rows: [b], vs: [a], factor: train.lr, column: acc, "
              "expect: not higher, margin: 1.0}\n"
              "  - {claim: a not above c, rows: [a], vs: [c], factor: train.lr, column: acc, "
              "expect: not higher, margin: 1.0}\n"
              "  - {claim: c not below b, rows: [c], vs: [b], factor: train.lr, column: acc, "
              "expect: not lower, margin: 1.0}\n"
              "  - {claim: c not below a, rows: [c], vs: [a], factor: train.lr, column: acc, "
              "expect: not lower, margin: 1.0}\n")


def test_not_higher_and_not_lower_are_tested_against_their_margin(tmp_path):
    """Non-superiority with known answers: b 3 points below a: not higher, supported; a 3
    points above c: contradicted; c equal to b: not lower, supported; c 3 below a:
    contradicted; then b equal to a: supported, which a test of Δ = 0 never says. The oracle is
    scipy's one-sided Welch test against the bound (ttest_ind of a shifted sample), Holm over
    the four by statsmodels."""
    g = load(tmp_path, GRID + NOT_HIGHER)
    accs = {"a": [90.9, 91.0, 91.1], "b": [88.0, 88.1, 87.95], "c": [87.9, 88.0, 88.15]}
    rows, _ = conclusions(g, runs_of(g, accs))

    def one_sided(x, y, bound, alternative):  # H1: mean(x) − mean(y) <(>) bound
        return sp.ttest_ind(np.asarray(x) - bound, y, equal_var=False,
                            alternative=alternative).pvalue
    pvals = [min(one_sided(accs["b"], accs["a"], 1.0, "less"),
                 one_sided(accs["b"], accs["a"], 1.0, "greater")),
             one_sided(accs["a"], accs["c"], 1.0, "greater"),
             one_sided(accs["c"], accs["b"], -1.0, "greater"),
             one_sided(accs["c"], accs["a"], -1.0, "less")]
    ph = sm_holm(pvals)
    got = {k: rows[k][6] for k in rows}
    assert got == {"b not above a": "**supported**", "a not above c": "**contradicted**",
                   "c not below b": "**supported**", "c not below a": "**contradicted**"}
    for k, p, h in zip(got, pvals, ph):
        assert rows[k][5] == p_cell(p, h), k
    assert rows["c not below b"][1] == "c (3) vs b (3); lr: not lower, margin 1"
    # no difference at all (b = a, tight): a test of Δ = 0 finds nothing; this one supports
    same = dict(accs, b=[90.95, 91.0, 91.05])
    assert conclusions(g, runs_of(g, same))[0]["b not above a"][6] == "**supported**"


def sm_holm(pvals):
    from statsmodels.stats.multitest import multipletests
    return list(multipletests(pvals, method="holm")[1])


def test_an_open_claim_plans_its_seeds_at_its_margin(tmp_path):
    """Seeds that overlap leave `a beats b` open; the plan: statsmodels' seeds a row for 80 %
    power at a true difference of the margin (0.5), the rows' pooled sd, level 0.05 / 2 (two
    claims have a test). Rows without runs say which."""
    g = load(tmp_path, GRID + CLAIMS)
    a, b = [89.0, 90.0, 91.0], [88.6, 89.3, 89.9]
    rows, _ = conclusions(g, runs_of(g, {"a": a, "b": b}))
    assert rows["a beats b"][6] == "**not enough runs**"
    sd = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    n = math.ceil(TTestIndPower().solve_power(effect_size=0.5 / sd, alpha=0.05 / 2, power=0.8))
    assert rows["a beats b"][7] == f"{n} seeds a row (+{n - 3} a; +{n - 3} b)"
    assert rows["c beats a"][7] == "no runs yet of c"
    rows, _ = conclusions(g, runs_of(g, {"a": [88.8, 89.0, 89.1], "b": [90.9, 91.0, 91.2]}))
    assert rows["a beats b"][6] == "**contradicted**"
    rows, _ = conclusions(g, {})
    assert rows["a beats b"][7] == "no runs yet of a, b"
    rows, _ = conclusions(g, runs_of(g, {"a": [91.0], "b": [89.0]}))
    assert rows["a beats b"][7] == "2 seeds or more a row (no spread yet)"


def test_rows_of_other_settings_are_refused_not_pooled(tmp_path):
    """d differs from a in batch size too: a claim about lr alone cannot pair them, and says
    so; with two matched pairs (a 2 x 2 of lr and batch) the claim averages the pairs."""
    g = load(tmp_path, GRID + "claims:\n  - {claim: lr alone, rows: [d], vs: [a], factor: "
                              "train.lr, column: acc, expect: higher, margin: 0.5}\n")
    rows, _ = conclusions(g, runs_of(g, {"a": [90.8, 91.0, 91.2], "d": [92.0, 92.1, 92.2]}))
    assert rows["lr alone"][6] == "**confounded**"
    assert rows["lr alone"][7] == ("d has no row in vs that differs from it in lr alone "
                                   "(a also in batch_size)")
    square = ("name: c\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
              "columns:\n  - {label: acc, metric: test_accuracy, fmt: .2f}\n"
              "factorial: {train.lr: [0.01, 0.001], train.batch_size: [16, 32]}\n"
              "claims:\n  - {claim: lr, rows: [r01, r02], vs: [r03, r04], factor: train.lr, "
              "column: acc, expect: higher, margin: 0.5}\n"
              "  - {claim: vs reordered, rows: [r01, r02], vs: [r04, r03], factor: train.lr, "
              "column: acc, expect: higher, margin: 0.5}\n")
    g = load(tmp_path, square)  # r01 lr .01 b16, r02 .01 b32, r03 .001 b16, r04 .001 b32
    accs = {"r01": [90.0, 90.5, 91.0], "r02": [88.0, 88.2, 88.4],
            "r03": [89.0, 89.4, 89.8], "r04": [87.0, 87.1, 87.2]}
    rows, _ = conclusions(g, runs_of(g, accs))
    want = S.contrast([(accs["r01"], accs["r03"]), (accs["r02"], accs["r04"])])
    assert rows["lr"][1].startswith("r01 (3) vs r03 (3); r02 (3) vs r04 (3); lr: higher")
    assert rows["lr"][4] == f"+{want.diff:.2f}" and rows["vs reordered"][1] == rows["lr"][1]


def test_a_claim_whose_runs_ran_on_two_machines_names_them(tmp_path):
    """Seeds of one side from another CPU: the claim says so (a timing then measures the
    machines too); runs of one machine add nothing."""
    g = load(tmp_path, GRID + CLAIMS)
    runs = runs_of(g, {"a": [90.8, 91.0, 91.2], "b": [88.9, 89.0, 89.2]})
    rows, _ = conclusions(g, runs)
    assert rows["a beats b"][1] == "a (3) vs b (3); lr: higher, margin 0.5"
    for name, run in runs.items():
        run.metrics[METRICS]["device_name"] = "CPU | B" if name == "c-b-s2" else "CPU A"
    rows, md = conclusions(g, runs)
    assert rows["a beats b"][1] == ("a (3) vs b (3); lr: higher, margin 0.5; runs from CPU A, "
                                    "CPU / B")
    assert rows["a above 90"][1] == "a (3): higher than 90, margin 0.5"  # one machine
    assert md.count("runs from") == 1  # that claim's row alone


def test_study_figures_are_one_run_of_our_noise(tmp_path):
    """The study's figure is one seeded run: our seeds against it by the prediction test, whose
    oracle is the pooled two-sample t-test of our seeds and that one run; Holm over the rows of
    the column; one run has no spread."""
    g = load(tmp_path, GRID)
    a, b = [90.8, 91.0, 91.2], [90.0, 91.5]
    frame = report.build(g, runs_of(g, {"a": a, "b": b}))[1]
    sec = claims.section(g, frame)
    assert "names no claims of the study" in sec
    pa, pb = (sp.ttest_ind(x, [f], equal_var=True).pvalue for x, f in ((a, 92.0), (b, 91.0)))
    ha, hb = sm_holm([pa, pb])
    line = next(x for x in sec.splitlines() if x.startswith("| a | acc |"))
    need = sp.t.ppf(1 - 0.05 / 4, 2) * np.std(a, ddof=1) * math.sqrt(1 + 1 / 3)
    assert line == (f"| a | acc | 91.00 [90.50 – 91.50] (n=3) | 92.00 | -1.00 | "
                    f"{p_cell(pa, ha)} | **{'beyond' if ha < 0.05 else 'within'} noise** | "
                    f"\\|Δ\\| > {need:.2f} |")
    assert claims.row_verdicts(g, frame) == {
        ("a", "acc"): "beyond noise" if ha < 0.05 else "within noise",
        ("b", "acc"): "beyond noise" if hb < 0.05 else "within noise"}
    one = claims.section(g, report.build(g, runs_of(g, {"b": [90.0]}))[1])
    assert "| b | acc | 90.00 | 91.00 | -1.00 | — | **1 run: no spread** | — |" in one


def test_report_of_table2_has_intervals_and_conclusions(tmp_path, monkeypatch):
    """`python -m ablation.report grids/table2.yaml` from the committed record: intervals in
    the table and a Conclusions section whose verdicts the runs give."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r"
    command.main(os.path.join("grids", "table2.yaml"), str(out), runs={})
    md = (out / "table2.md").read_text()
    head, concl = md.split("## Conclusions")
    assert re.search(r"\| \d+\.\d+ \[\d+\.\d+\W+\d+\.\d+\] \(n=3\) \|", head)  # a cell
    assert "RBF beats polynomial on MNIST" in concl and "**" in concl
    assert concl.count("**supported**") + concl.count("**contradicted**") + \
        concl.count("**not enough runs**") >= 2
    assert "### Ours against the study's figures" in concl
