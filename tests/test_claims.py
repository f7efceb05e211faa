"""The grid file's claims (grid.schema) and the report's Conclusions (report.claims): checked
like every other key, tested on the recorded runs, verdicts computed, never typed."""
import os
import re
import subprocess
import sys

import pytest
from scipy import stats as sp

from ablation.core.cli import UserError
from ablation.grid import schema as G
from ablation.record.run import Run
from ablation.report import claims, command
from ablation.report import tables as report
from ablation.report.stats import compare, seeds_needed

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
          "  - {claim: a beats b, rows: [a], vs: [b], column: acc, expect: higher}\n"
          "  - {claim: c beats a, rows: [c], vs: [a], column: acc, expect: higher}\n"
          "  - {claim: d matches a, rows: [d], vs: [a], column: acc, expect: same}\n"
          "  - {claim: a above 90, rows: [a], than: 90, column: acc, expect: higher}\n")


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
     "unknown key 'claims[1].verdict' (allowed keys: claim, rows, vs, than, column, expect)"),
    ("{rows: [a], vs: [b], column: acc, expect: higher}", "missing key 'claims[1].claim'"),
])
def test_malformed_claim_is_one_clear_error(tmp_path, claim, expect):
    with pytest.raises(UserError) as e:
        load(tmp_path, GRID + f"claims:\n  - {claim}\n")
    assert str(e.value).startswith(str(tmp_path / "g.yaml")) and expect in str(e.value)


def test_bad_claim_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(GRID + "claims:\n  - {claim: x, rows: [r9], vs: [a], column: acc, "
                        "expect: higher}\n")
    r = subprocess.run([sys.executable, "-m", "ablation.report", str(p), "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{p}: claims[1].rows = ['r9']: allowed:" in r.stderr


def test_verdicts_come_from_the_runs(tmp_path):
    """a (3 seeds, ~91.0) clearly above b (3 seeds, ~89.0): supported; c (3 seeds, ~88.0)
    "beats" a: contradicted; d has one run: not enough runs, the seeds taken from a's spread;
    a above 90 by 1.0 with sd 0.2: supported. Holm over the three claims that have a test."""
    g = load(tmp_path, GRID + CLAIMS)
    accs = {"a": [90.8, 91.0, 91.2], "b": [88.9, 89.0, 89.2], "c": [87.9, 88.0, 88.2],
            "d": [91.1]}
    rows, md = conclusions(g, runs_of(g, accs))
    p = sp.ttest_ind(accs["a"], accs["b"], equal_var=False).pvalue
    assert rows["a beats b"][1] == "a (3) higher than b (3)"
    assert rows["a beats b"][2] == "lr"  # what the rows differ in, from their params
    assert rows["a beats b"][4:7] == ["91.00 vs 89.03", "+1.97", format(p, ".2g")]
    assert rows["a beats b"][8] == "**supported**"
    assert rows["c beats a"][8] == "**contradicted**"
    assert rows["d matches a"][2] == "batch_size, lr"
    assert rows["d matches a"][6:9] == ["—", "—", "**not enough runs**"]
    assert rows["d matches a"][9].endswith("taking the other side's sd")
    assert rows["a above 90"][1] == "a (3) higher than 90"
    assert rows["a above 90"][8] == "**supported**"
    pvals = [sp.ttest_ind(accs["a"], accs["b"], equal_var=False).pvalue,
             sp.ttest_ind(accs["c"], accs["a"], equal_var=False).pvalue,
             sp.ttest_1samp(accs["a"], 90).pvalue]
    assert float(rows["a beats b"][7]) == pytest.approx(
        claims.holm(pvals)[0], rel=0.05)  # Holm over the three claims with a test


def test_the_same_claim_flips_with_the_runs(tmp_path):
    """The grid says what is compared; the runs decide: b above a contradicts `a beats b`,
    overlapping seeds leave it open with the seeds that would settle it, and rows without runs
    say which rows need them."""
    g = load(tmp_path, GRID + CLAIMS)
    rows, _ = conclusions(g, runs_of(g, {"a": [88.8, 89.0, 89.1], "b": [90.9, 91.0, 91.2]}))
    assert rows["a beats b"][8] == "**contradicted**"
    a, b = [89.0, 90.0, 91.0], [88.6, 89.3, 89.9]
    rows, _ = conclusions(g, runs_of(g, {"a": a, "b": b}))
    assert rows["a beats b"][8] == "**not enough runs**"
    n = seeds_needed(compare(a, b), 0.05 / 4)  # 4 claims: under 0.05 / 4 Holm rejects
    assert 3 < n < 1000 and rows["a beats b"][9] == f"{n} seeds a side (+{n - 3} a; +{n - 3} b)"
    assert rows["c beats a"][9] == "no runs yet of c"
    rows, _ = conclusions(g, {})
    assert rows["a beats b"][9] == "no runs yet of a and b"


def test_a_claim_whose_runs_ran_on_two_machines_names_them(tmp_path):
    """Seeds of one side from another CPU: the claim says so beside what the rows differ in
    (a timing then measures the machines too); runs of one machine add nothing."""
    g = load(tmp_path, GRID + CLAIMS)
    runs = runs_of(g, {"a": [90.8, 91.0, 91.2], "b": [88.9, 89.0, 89.2]})
    rows, _ = conclusions(g, runs)
    assert rows["a beats b"][2] == "lr"  # no machine on record: nothing said
    for name, run in runs.items():
        run.metrics[METRICS]["device_name"] = "CPU | B" if name == "c-b-s2" else "CPU A"
    rows, md = conclusions(g, runs)
    assert rows["a beats b"][2] == "lr; runs from 2 machines: CPU A, CPU / B"
    assert rows["a above 90"][2] == "—"  # a's runs: one machine
    assert md.count("runs from 2 machines") == 1  # that claim's row alone


def test_study_figures_against_our_interval(tmp_path):
    """The table marks the study's figure inside (∈) or outside (∉) our interval; the
    Conclusions test it, Holm over the rows of each column; one run has no spread."""
    g = load(tmp_path, GRID)
    md, frame = report.build(g, runs_of(g, {"a": [90.8, 91.0, 91.2], "b": [90.0, 91.5]}))
    assert "| 91.00 [90.50 – 91.50] (n=3) | 92.00 ∉ | -1.00 |" in md
    assert "| 90.75 [81.22 – 100.28] (n=2) | 91.00 ∈ | -0.25 |" in md
    sec = claims.section(g, frame)
    assert "names no claims of the study" in sec
    line = next(x for x in sec.splitlines() if x.startswith("| a | acc |"))
    p = sp.ttest_1samp([90.8, 91.0, 91.2], 92.0).pvalue
    assert f"| {format(p, '.2g')} | {format(min(1, 2 * p), '.2g')} | **beyond noise** |" in line
    one = claims.section(g, report.build(g, runs_of(g, {"b": [90.0]}))[1])
    assert "| b | acc | 90.00 | 91.00 | -1.00 | — | — | **1 run: no spread** |" in one


def test_report_of_table2_has_intervals_and_conclusions(tmp_path, monkeypatch):
    """`python -m ablation.report grids/table2.yaml` from the committed record: intervals in
    the table and a Conclusions section whose verdicts the runs give."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r"
    command.main(os.path.join("grids", "table2.yaml"), str(out), runs={})
    md = (out / "table2.md").read_text()
    head, concl = md.split("## Conclusions")
    assert re.search(r"\| \d+\.\d+ \[\d+\.\d+ – \d+\.\d+\] \(n=3\) \|", head)  # a cell
    assert "RBF beats polynomial on MNIST" in concl and "**" in concl
    assert concl.count("**supported**") + concl.count("**contradicted**") + \
        concl.count("**not enough runs**") >= 2
    assert "### Ours against the study's figures" in concl
