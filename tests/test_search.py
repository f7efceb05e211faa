"""`grid search`: the search section's checks, trial identity, the budget, and the confirmation's
verdict against scipy; the search itself on a real two-node Ray cluster is in test_cluster.py."""
import copy

import pytest
from scipy import stats as sp

from ablation.core.cli import UserError
from ablation.grid import schema as G
from ablation.grid.space import settings
from ablation.report import search as R
from ablation.search.trials import job, row_id

from .helpers import PARAMS
from .test_grid_report import as_runs, fake_exp

BASE = """name: s
targets: [train]
set: {data.datasets: [mnist], data.train_limit: 640, train.epochs: 3}
columns:
  - {label: acc %, metric: test_accuracy, fmt: .2f}
"""
SEARCH = """search:
  column: acc %
  trials: 4
  margin: 1.0
  top: 2
  seeds: 2
"""


def load(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return G.load(str(p), params_path=PARAMS)


def test_a_search_space_from_the_factorial_and_ranges(tmp_path):
    g = load(tmp_path, BASE + "factorial: {train.optimizer: [adam, sgd]}\n" + SEARCH +
             "  space: {train.lr: {low: 0.0001, high: 0.1, scale: log},\n"
             "          train.batch_size: {low: 8, high: 64}}\n")
    space = g["search"]["space"]
    assert space == {"train.optimizer": ("values", ["adam", "sgd"]),
                     "train.lr": ("range", 0.0001, 0.1, True, False),
                     "train.batch_size": ("range", 8, 64, False, True)}
    assert settings(space) is None and len(g["rows"]) == 2  # the factorial is still a grid
    assert g["search"]["pruner"] == "median" and g["search"]["sampler"] == "tpe"
    only = load(tmp_path, BASE + SEARCH + "  space: {train.lr: {values: [0.1, 0.01]}}\n")
    assert only["rows"] == [] and settings(only["search"]["space"]) == [
        {"train.lr": 0.1}, {"train.lr": 0.01}]


@pytest.mark.parametrize("extra,match", [
    ("  space: {train.lr_max: {values: [1]}}\n", r"search\.space\.train\.lr_max: unknown "
                                                 r"parameter \(known: train\.models"),
    ("  space: {train.lr: {values: []}}\n", r"search\.space\.train\.lr = .*allowed: \{values: "
                                            r"a non-empty list\}"),
    ("  space: {train.lr: {low: 0, high: 0.1, scale: log}}\n", r"search\.space\.train\.lr: a "
                                                               r"log scale needs low > 0"),
    ("  space: {train.lr: {low: 0.1, high: 0.01}}\n", r"low 0\.1 >= high 0\.01"),
    ("  space: {train.lr: {values: [-1]}}\n", r"search\.space\.train\.lr = -1: .*train\.lr"),
    ("  space: {train.lr: {values: [0.1]}}\n  pruner: asha\n",
     r"search\.pruner = 'asha': allowed: one of median, hyperband, none"),
    ("  space: {data.datasets: {values: [[mnist, fashion_mnist]]}}\n",
     r"a trial must run one dataset and one model"),
])
def test_a_bad_search_section_is_one_line_naming_the_file_and_key(tmp_path, extra, match):
    with pytest.raises(UserError, match=r"s\.yaml: " + ".*" + match):
        load(tmp_path, BASE + SEARCH + extra)


@pytest.mark.parametrize("field,value,match", [
    ("trials", 0, r"search\.trials = 0: allowed: an integer >= 1"),
    ("top", 9, r"search\.top = 9: allowed: at most search\.trials \(4\)"),
    ("seeds", 1, r"search\.seeds = 1: allowed: an integer >= 2"),
    ("margin", 0, r"search\.margin = 0: allowed: a number > 0"),
    ("column", "'time'", r"search\.column = 'time': allowed: one of acc %"),
    ("hours", 0, r"search\.hours = 0: allowed: a number > 0"),
])
def test_a_bad_budget_or_objective_is_refused(tmp_path, field, value, match):
    text = BASE + "factorial: {train.lr: [0.1]}\n" + SEARCH
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"  {field}:")]
    with pytest.raises(UserError, match=match):
        load(tmp_path, "\n".join(lines) + f"\n  {field}: {value}\n")


def test_no_search_space_and_no_rows_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"search\.space: empty"):
        load(tmp_path, BASE + SEARCH)


def test_a_setting_is_one_experiment_whoever_samples_it(tmp_path):
    g = load(tmp_path, BASE + "factorial: {train.lr: [0.1, 0.01]}\n" + SEARCH)
    g["path"] = "s.yaml"
    a, b = {"train.lr": 0.01, "train.batch_size": 32}, {"train.batch_size": 32, "train.lr": 0.01}
    assert row_id(a) == row_id(b) and row_id(a) != row_id({**a, "train.lr": 0.1})
    t = job(g, a, 0, trial=True, params_path=PARAMS)
    c = job(g, a, 1, trial=False, params_path=PARAMS)
    assert t.name == f"s-{row_id(a)}-s0" and c.name == f"s-{row_id(a)}-s1"
    assert t.params["train"]["trial"] == t.name and c.params["train"]["trial"] is None
    assert t.params["train"]["lr"] == 0.01 and c.params["train"]["seed"] == 1
    assert G.variants_of(g, t.name) == {None}  # the report keeps it as a run of the grid


def confirm_runs(g, values, trial_figures, pruned=()):
    """{name: Run}: per setting row, a trial (seed 0) with its figure (or pruned) and
    confirmation runs at seeds 1.. with `values`."""
    exps = {}
    path = "metrics/resnet/mnist/resnet18.json"
    for lr, vals in values.items():
        setting = {"train.lr": lr}
        row = row_id(setting)
        p = copy.deepcopy(g["rows"][0]["params"])
        p["train"].update(lr=lr, trial=f"s-{row}-s0")
        m = {"test_accuracy": trial_figures[lr], "pruned": lr in pruned, "epochs_completed":
             1 if lr in pruned else 3, "train_images": 640}
        exps[f"s-{row}-s0"] = fake_exp(p, {path: m})
        for seed, v in enumerate(vals, 1):
            q = copy.deepcopy(p)
            q["train"].update(trial=None, seed=seed)
            exps[f"s-{row}-s{seed}"] = fake_exp(q, {path: {"test_accuracy": v, "pruned": False,
                                                            "epochs_completed": 3,
                                                            "train_images": 640}})
    return as_runs(exps)


def test_the_confirmation_tests_the_best_against_the_others_as_scipy_does(tmp_path):
    """Three settings confirmed at three seeds: the best by mean against each other with
    Welch's test (scipy's ttest_ind, unequal variances) and Holm over the two; the fall is the
    best trial's figure less its confirmed mean."""
    g = load(tmp_path, BASE + "factorial: {train.lr: [0.1, 0.01, 0.001]}\n" + SEARCH)
    vals = {0.1: [80.0, 81.0, 80.5], 0.01: [90.0, 91.0, 90.4], 0.001: [89.0, 88.2, 88.9]}
    runs = confirm_runs(g, vals, {0.1: 82.0, 0.01: 92.5, 0.001: 90.0})
    c = R.confirmation(g, runs)
    assert [r for r, _, _ in c.ranked] == [row_id({"train.lr": x}) for x in (0.01, 0.001, 0.1)]
    ps = [sp.ttest_ind(vals[0.01], vals[x], equal_var=False).pvalue for x in (0.001, 0.1)]
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    holm, top = [0.0] * m, 0.0
    for k, i in enumerate(order):
        top = max(top, min(1.0, (m - k) * ps[i]))
        holm[i] = top
    assert [t[2] for t in c.tests] == pytest.approx(holm, rel=1e-9)
    assert c.verdict == ("beats the runner-up" if holm[0] < 0.05 else
                         "not enough runs to tell it from the runner-up")
    assert c.fall == pytest.approx(92.5 - sum(vals[0.01]) / 3)
    md = R.section(g, runs)
    assert "## Search" in md and "best confirmed: " + row_id({"train.lr": 0.01}) in md


def test_equivalent_settings_and_a_pruned_trial_in_the_section(tmp_path):
    """Two settings whose confirmed means differ by far less than the margin (1.0) with a small
    spread: equivalent; a pruned trial is listed as pruned at its epoch, its images counted."""
    g = load(tmp_path, BASE + "factorial: {train.lr: [0.1, 0.01, 0.001]}\n" + SEARCH)
    vals = {0.1: [90.0, 90.1, 90.05, 89.95], 0.01: [90.02, 90.08, 90.0, 90.04], 0.001: []}
    runs = confirm_runs(g, vals, {0.1: 90.3, 0.01: 90.1, 0.001: 12.0}, pruned=(0.001,))
    c = R.confirmation(g, runs)
    assert c.verdict == "equivalent to the runner-up"
    md = R.section(g, runs)
    row = next(line for line in md.splitlines() if row_id({"train.lr": 0.001}) in line)
    assert "| pruned |" in row and "| 1 | 640 |" in row
    assert "Trials trained 4,480 images, 78% of the full grid's 5,760." in md


SETTLE = """name: q
targets: [train]
set: {data.datasets: [mnist]}
columns:
  - {label: acc, metric: test_accuracy}
rows: [{id: a, set: {train.lr: 0.001}}, {id: b, set: {train.lr: 0.002}}]
claims:
  - {claim: a beats b, rows: [a], vs: [b], factor: train.lr, column: acc, expect: higher,
     margin: 1.0}
"""


def sequential_rate(g, reps, max_seeds, level=None, seed=0):
    """How often `until_settled`, on runs whose rows do not differ (every seed N(90, 1)), ends
    with the claim decided: rounds of fake runs through the real tables, claims and rounds."""
    import random

    from ablation.report.tables import tabulate
    from ablation.search.settle import until_settled
    rng, decided = random.Random(seed), 0
    for _ in range(reps):
        exps = {}

        def run_round(want):
            for row, n in want.items():
                params = next(r["params"] for r in g["rows"] if r["id"] == row)
                for s in range(n):
                    if f"q-{row}-s{s}" not in exps:
                        q = copy.deepcopy(params)
                        q["train"]["seed"] = s
                        exps[f"q-{row}-s{s}"] = fake_exp(q, {
                            "metrics/resnet/mnist/resnet18.json":
                                {"test_accuracy": rng.gauss(90.0, 1.0)}})
        results, _ = until_settled(g, lambda: tabulate(g, as_runs(exps)).frame, run_round,
                                   max_seeds, say=lambda line: None, level=level)
        decided += results[0].verdict != "not enough runs"
    return decided / reps


@pytest.mark.slow
def test_seeds_until_settled_keep_false_positives_at_5_percent(tmp_path):
    """No true difference, looks at 2..6 seeds a row: the corrected looks (α / 5 each) decide
    the claim at most 5 % of the time (plus three Monte Carlo errors); the same looks at α each
    decide it far more often, which is what the correction is for."""
    g = load(tmp_path, SETTLE)
    reps = 600
    se = (0.05 * 0.95 / reps) ** 0.5
    corrected = sequential_rate(g, reps, 6)
    assert corrected <= 0.05 + 3 * se, corrected
    naive = sequential_rate(g, reps, 6, level=0.05, seed=1)
    assert naive > 0.05 + 3 * se, naive


def test_a_round_goes_only_to_rows_of_open_claims(tmp_path):
    """Rows a, b, c with no runs: all to 2 seeds. Then `a beats b` is decided (a far above b,
    both tight), so the next round adds a third seed to b and c alone; `c beats b` is still
    open at 3 seeds, the most a row may have: the rounds stop and say so."""
    from ablation.report.tables import tabulate
    from ablation.search.settle import until_settled
    g = load(tmp_path, SETTLE.replace("{id: b, set: {train.lr: 0.002}}]",
                                      "{id: b, set: {train.lr: 0.002}},\n"
                                      "       {id: c, set: {train.lr: 0.003}}]")
             + "  - {claim: c beats b, rows: [c], vs: [b], factor: train.lr, column: acc, "
               "expect: higher,\n     margin: 1.0}\n")
    figures = {"a": [95.0, 95.01, 95.0], "b": [90.0, 90.02, 90.1], "c": [90.0, 91.0, 92.0]}
    exps, rounds = {}, []

    def run_round(want):
        rounds.append(dict(want))
        for row, n in want.items():
            params = next(r["params"] for r in g["rows"] if r["id"] == row)
            for s in range(n):
                q = copy.deepcopy(params)
                q["train"]["seed"] = s
                exps[f"q-{row}-s{s}"] = fake_exp(q, {"metrics/resnet/mnist/resnet18.json":
                                                     {"test_accuracy": figures[row][s]}})
    results, why = until_settled(g, lambda: tabulate(g, as_runs(exps)).frame, run_round, 3,
                                 say=lambda line: None)
    assert rounds == [{"a": 2, "b": 2, "c": 2}, {"b": 3, "c": 3}]
    assert why == "1 claim(s) open with 3 seeds a row"
    assert [t.verdict for t in results] == ["supported", "not enough runs"]


SETTLED = """name: qs
targets: [train]
set: {data.datasets: [mnist], data.train_limit: 640, data.test_limit: 200, train.epochs: 2,
      train.threads: 1, train.device: cpu}
columns:
  - {label: acc %, metric: test_accuracy, fmt: .2f}
rows: [{id: a, set: {train.lr: 0.002}}, {id: b, set: {train.lr: 1.0e-7}}]
claims:
  - {claim: a learns and b does not, rows: [a], vs: [b], factor: train.lr, column: acc %,
     expect: higher, margin: 5.0}
"""


@pytest.mark.slow
def test_queue_until_settled_stops_when_the_claim_is_decided(shrunk_base, tmp_path):
    """A real DVC queue: seeds go to both rows in rounds (2, then one more) and stop at the
    first look that decides the claim (a learns, b at lr 1e-7 does not), far below --max-seeds;
    the level is recorded and the report judges at it; the same command again runs nothing."""
    import json
    import re
    import sys

    from .test_cluster import clone
    c = clone(tmp_path, shrunk_base, "qs", SETTLED)
    cmd = [sys.executable, "-m", "ablation.grid", "queue", "grids/qs.yaml", "--until-settled",
           "--max-seeds", "6"]
    out = c.sh(*cmd)
    assert "stopped: every claim decided" in out and "- a learns and b does not: supported" \
        in out, out
    names = [n for n in c.sh("dvc", "exp", "list", "--name-only").split() if n.startswith("qs-")]
    per_row = {r: sum(n.startswith(f"qs-{r}-s") for n in names) for r in ("a", "b")}
    assert per_row["a"] == per_row["b"] and 2 <= per_row["a"] < 6, (per_row, out)
    looks = re.findall(r"^look (\d+): (\d) of 1 claim", out, re.M)
    assert looks[-1][1] == "1" and all(d == "0" for _, d in looks[:-1]), out
    assert len(looks) == per_row["a"]  # one before any run (no test), at 2 seeds, one a round
    saved = json.loads((c.repo / "reports" / "qs.settle.json").read_text())
    assert saved["level"] == pytest.approx(0.05 / 5) and saved["stopped"] == \
        "every claim decided"
    again = c.sh(*cmd)
    assert "look 1: 1 of 1 claim(s) decided" in again and "dvc exp run --queue" not in again
    c.sh(sys.executable, "-m", "ablation.report", "grids/qs.yaml")
    md = (c.repo / "reports" / "qs.md").read_text()
    assert "Seeds added until settled" in md and "0.01" in md


def test_the_search_section_estimates_importance_and_draws_its_figures(tmp_path):
    """Three completed trials of one param: fANOVA gives it all the importance, said to be an
    estimate from the trials run; the history and parallel-coordinates PNGs are drawn (offline,
    real PNG files) and linked from the section."""
    g = load(tmp_path, BASE + "factorial: {train.lr: [0.1, 0.01, 0.001]}\n" + SEARCH)
    vals = {0.1: [80.0, 81.0], 0.01: [90.0, 91.0], 0.001: [89.0, 88.2]}
    runs = confirm_runs(g, vals, {0.1: 82.0, 0.01: 92.5, 0.001: 90.0})
    md = R.section(g, runs)
    assert "Parameter importance (Optuna's fANOVA over the 3 completed trials: an estimate " \
           "from the trials run" in md and "train.lr 1.00." in md
    pngs = R.figures(g, runs, str(tmp_path))
    assert pngs == ["s_search_history.png", "s_search_parallel.png"]
    for p in pngs:
        data = (tmp_path / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "![s_search_history.png](s_search_history.png)" in R.section(g, runs, pngs)
    few = confirm_runs(g, {0.1: [80.0, 81.0]}, {0.1: 82.0})
    assert "not estimated (under three settings completed)" in R.section(g, few)


@pytest.mark.parametrize("argv,match", [
    (["search", "g.yaml"], r"g\.yaml: search\.pruner = 'asha': allowed: one of median, "
                           r"hyperband, none"),
    (["search", "ok.yaml", "--seeds", "1"], r"--seeds 1: allowed: an integer >= 2"),
    (["search", "ok.yaml", "--parallel", "0"], r"--parallel 0: allowed: an integer >= 1"),
    (["show", "ok.yaml", "--until-settled"], r"--until-settled goes with queue or run"),
    (["queue", "ok.yaml", "--until-settled", "--seeds", "3"], r"leave out --seeds"),
    (["queue", "ok.yaml", "--until-settled"], r"ok\.yaml: no claims"),
    (["search", "plain.yaml"], r"plain\.yaml: no 'search:' section"),
])
def test_bad_search_commands_are_one_line_and_create_nothing(tmp_path, argv, match):
    """Through `python -m ablation.grid` (which hands over to ablation.search): exit status 2,
    one line naming the file and key or the flag, nothing written."""
    import re
    import shutil
    import subprocess
    import sys
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    ok = BASE + "factorial: {train.lr: [0.1, 0.01]}\n" + SEARCH
    (tmp_path / "ok.yaml").write_text(ok)
    (tmp_path / "g.yaml").write_text(ok + "  pruner: asha\n")
    (tmp_path / "plain.yaml").write_text(BASE + "rows: [{id: a}]\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "ablation.grid", *argv], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
