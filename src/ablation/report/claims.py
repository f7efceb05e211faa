"""The report's Conclusions, computed from the recorded runs, never typed: each of the study's
claims that the grid file names (`claims:`, grid.schema) tested on our runs, and our runs set
against the study's figures, row by row. LEGEND and FIGURES_LEGEND say each method as the
report prints it.

Like with like: a claim's replicates are the seeds of one row, never rows of different
settings; each row is paired with the one row of `vs` that differs from it in the claim's
`factor` alone, and the mean over the pairs of (row − pair) is a Welch-type contrast
(report.stats.contrast). Matched pairs rather than a linear model with the other params as
terms: with three seeds a row and a few pairs, more terms leave no degrees of freedom, and the
contrast says exactly what is averaged. A row without such a pair makes the claim `confounded`.

Verdicts (decide), Holm over the grid's claims: higher / lower by a two-sided test of Δ = 0;
not higher / not lower as non-superiority, one-sided tests against the bound +margin (−margin),
since a test of Δ = 0 could support them only by finding the opposite difference; same by TOST
within the margin against the test of |Δ| ≤ margin. `to settle` plans seeds for 80 % power at
level 0.05 / M (plan_seeds). The study's figure is one seeded run: the prediction test.
"""
import json
from typing import NamedTuple

from scipy import stats as sp

from ablation.grid.schema import relevant_keys
from ablation.report.format import markdown, signed
from ablation.report.format import value as fmt
from ablation.report.runs import param_value, planned
from ablation.report.stats import (
    ALPHA,
    MAX_SEEDS,
    Contrast,
    contrast,
    holm,
    one_run,
    p_above,
    p_below,
    p_difference,
    p_equivalence,
    p_outside,
    pooled_sd,
    power_difference,
    power_equivalence,
    power_one_sided,
    seeds_for_power,
    summarize,
)
from ablation.report.tables import cell, numbers

SIGNS = {"higher": 1, "lower": -1}  # the sign of Δ a directional claim expects
BOUND = {"not higher": 1, "not lower": -1}  # the side of a non-superiority claim's bound
P_FMT = ".2g"
LEGEND = (
    "**Claims.** Replicates are the seeds of one row; a claim pairs each of its rows with the "
    "row that differs from it in the claim's factor alone and tests the mean over the pairs of "
    "(row − pair): a Welch-type contrast, each row's own spread, Welch–Satterthwaite df (one "
    "pair: Welch's t-test, `scipy.stats.ttest_ind(equal_var=False)`); `than`: the rows' mean "
    "against a fixed threshold (one row: a one-sample t-test). `confounded`: a row has no such "
    "pair, so the claim as written cannot be tested on these rows. `higher` / `lower`: "
    "two-sided test of Δ = 0, `supported` / `contradicted` by the sign of Δ at Holm p < 0.05. "
    "`not higher` / `not lower`: non-superiority, one-sided tests of Δ against +margin "
    "(`not lower`: −margin): beyond it `contradicted`, short of it `supported`; the claim's p "
    "is the smaller. `same`: two one-sided tests (TOST) of |Δ| ≥ margin give `equivalent`, "
    "the two-sided test of |Δ| ≤ margin gives `different`; the claim's p is the smaller. Holm "
    "over the grid's claims. To settle (planned power): the seeds a row at which the claim's "
    "test has 80 % power at a true difference of its margin (`same`, `not higher`, `not "
    "lower`: of 0), under the pooled spread of its "
    "rows, at level 0.05 / M (M: the claims tested); noncentral t, not the observed Δ. Where a "
    "claim's runs ran on more than one machine, `tested as` names them: a timing difference "
    "then holds the machines' difference too.")
FIGURES_LEGEND = (
    "**Ours against the study's figures.** The study's figure is one seeded run: ours (n seeds, "
    "sd s) against it by the prediction test, t = Δ / (s·√(1 + 1/n)), df n − 1, two-sided, "
    "assuming the study's run has our spread; Holm over the rows of each column; `beyond "
    "noise` at Holm p < 0.05. `Beyond noise needs`: the smallest |Δ| this test would call "
    "beyond noise at level 0.05 / M (M: the column's lines), t(1 − 0.025 / M, n − 1) · s · "
    "√(1 + 1/n); more seeds of ours lower it only towards z · s, as the study's run stays one "
    "run. A column in which every row with 2 or more runs gives the same value each seed (a "
    "count, a model's size) is compared at the digits shown, not tested.")


class Tested(NamedTuple):
    """One claim and what the runs say: its pairs of rows (row, vs row, or None against a
    figure), the contrast, p and Holm p, verdict, what would settle it, the machines its runs
    ran on, and the line that refuses it (None where it was tested)."""
    claim: dict
    pairs: tuple
    c: Contrast | None
    p: float | None
    p_holm: float | None
    verdict: str
    settle: str
    machines: tuple = ()
    refused: str | None = None


def col_index(grid, label):
    return next(i for i, c in enumerate(grid["columns"] + grid["extra"]) if c["label"] == label)


def values(frame, ids, i):
    """Column i's numeric values over the runs of rows `ids` as planned, one a run."""
    f = planned(frame)
    return numbers(f[f["row"].isin(list(ids))][f"value_{i}"]) if len(f) else []


def machines(frame, ids, i):
    """The machines (device names as recorded) the runs of rows `ids` as planned ran on, for
    column i: a timing compared across them measures the machines too."""
    f = planned(frame)
    if not len(f):
        return set()
    f = f[f["row"].isin(list(ids))]
    names = (run.values(path).get("device_name") for run, path in zip(f["run"], f[f"file_{i}"]))
    return {str(n) for n in names if n}


def differing(grid, a, b):
    """The params ('section.key', seeds left out) whose planned values differ between rows
    a and b."""
    rows = {r["id"]: r["params"] for r in grid["rows"]}

    def seen(i, k):
        return json.dumps(param_value(rows[i], k), sort_keys=True, default=str)
    return [k for k in relevant_keys(grid) if not k.endswith(".seed") and seen(a, k) != seen(b, k)]


def short(keys):
    return ", ".join(k.partition(".")[2] for k in keys) or "nothing"


def pairs_of(grid, cl):
    """(pairs, None) where each row of the claim has exactly one row of `vs` that differs from
    it in the factor alone and each row of `vs` is used once; (None, the refusing line)
    otherwise. A claim against a figure pairs each row with None."""
    if "vs" not in cl:
        return tuple((a, None) for a in cl["rows"]), None
    fac = set(cl["factor"])
    out = []
    for a in cl["rows"]:
        fits = [b for b in cl["vs"] if (d := differing(grid, a, b)) and set(d) <= fac]
        if not fits:
            why = "; ".join(f"{b} also in {short(k for k in differing(grid, a, b) if k not in fac)}"
                            for b in cl["vs"])
            return None, (f"{a} has no row in vs that differs from it in "
                          f"{short(cl['factor'])} alone ({why})")
        if len(fits) > 1:
            return None, f"{a} differs from {', '.join(fits)} in {short(cl['factor'])} alone: " \
                         "name one of them in vs"
        out.append((a, fits[0]))
    used = [b for _, b in out]
    extra = [b for b in cl["vs"] if used.count(b) != 1]
    if extra:
        b = extra[0]
        return None, f"{b} of vs pairs with {used.count(b) or 'no'} row(s) of rows (it must " \
                     "pair with exactly one)"
    return tuple(out), None


def decide(cl, c):
    """(p, outcome) of one claim's contrast: the test's p and the verdict its rejection
    gives; (None, None) where there is no spread to test with."""
    if cl["expect"] == "same":
        pe, po = p_equivalence(c, cl["margin"]), p_outside(c, cl["margin"])
        if pe is None:
            return None, None
        return (pe, "equivalent") if pe <= po else (po, "different")
    if cl["expect"] in BOUND:  # Δ short of the bound supports, beyond it contradicts
        bound = BOUND[cl["expect"]] * cl["margin"]
        below, above = p_below(c, bound), p_above(c, bound)
        short, beyond = (below, above) if bound > 0 else (above, below)
        return (None, None) if short is None else \
            (short, "supported") if short <= beyond else (beyond, "contradicted")
    p = p_difference(c)
    return (None, None) if p is None else \
        (p, "supported" if (1 if c.diff > 0 else -1) == SIGNS[cl["expect"]] else "contradicted")


def verdict(outcome, p_holm, alpha=ALPHA):
    return outcome if p_holm is not None and p_holm < alpha else "not enough runs"


def plan_seeds(cl, pairs, sd, level):
    """The seeds a row at which the claim's test has 80 % power at its margin (module
    docstring), None where over MAX_SEEDS would be needed."""
    k, m, one = len(pairs), cl["margin"], "than" in cl
    if cl["expect"] == "same":
        return seeds_for_power(lambda n: power_equivalence(n, sd, m, level, k))
    if cl["expect"] in BOUND:  # a true Δ of 0 lies the margin short of the bound
        return seeds_for_power(lambda n: power_one_sided(n, sd, m, level, k, one_sample=one))
    return seeds_for_power(lambda n: power_difference(n, sd, m, level, k, one_sample=one))


def settle(cl, pairs, c, frame, i, level):
    """What would settle an open claim: the rows that have no run, or the planned seeds."""
    rows = [r for pair in pairs for r in pair if r is not None]
    counts = {r: len(values(frame, [r], i)) for r in rows}
    if c.diff is None:
        return "no runs yet of " + ", ".join(r for r in rows if not counts[r])
    sd = pooled_sd([values(frame, [r], i) for r in rows])
    if sd is None:
        return "2 seeds or more a row (no spread yet)"
    if "margin" not in cl:
        return "name a margin in the grid file to plan seeds"
    n = plan_seeds(cl, pairs, sd, level)
    if n is None:
        return f"over {MAX_SEEDS} seeds a row"
    more = [f"+{n - counts[r]} {r}" for r in rows if n > counts[r]]
    return f"{n} seeds a row" + (f" ({'; '.join(more)})" if more else
                                 f", as run: no difference of {fmt(cl['margin'])} seen")


def tested(grid, frame):
    """Each claim of the grid tested on the runs, Holm-corrected together."""
    found = []
    for cl in grid["claims"]:
        i = col_index(grid, cl["column"])
        pairs, refused = pairs_of(grid, cl)
        if refused:
            found.append((cl, (), None, None, None, refused))
            continue
        cells = [(values(frame, [a], i), None if b is None else values(frame, [b], i))
                 for a, b in pairs]
        c = contrast(cells, figure=cl.get("than"))
        found.append((cl, pairs, c, *decide(cl, c), None))
    adjusted = holm([f[3] for f in found])
    alpha = grid.get("claims_alpha") or ALPHA  # a settled grid's per-look level
    level = alpha / max(sum(f[3] is not None for f in found), 1)
    out = []
    for (cl, pairs, c, p, outcome, refused), ph in zip(found, adjusted):
        i = col_index(grid, cl["column"])
        ids = [r for pair in pairs for r in pair if r is not None]
        ran_on = tuple(sorted(machines(frame, ids, i)))
        if refused:
            out.append(Tested(cl, (), None, None, None, "confounded", refused, ran_on, refused))
            continue
        v = verdict(outcome, ph, alpha)
        out.append(Tested(cl, pairs, c, p, ph, v, "—" if v != "not enough runs" else
                          settle(cl, pairs, c, frame, i, level), ran_on))
    return out


def tested_as(t, frame, i):
    """'r02 (3) vs r04 (3); lr, epochs: same, margin 1': the pairs with their runs, then the
    factor, what the study expected and the margin."""
    cl = t.claim
    n = {r: len(values(frame, [r], i)) for pair in t.pairs for r in pair if r is not None}
    pairs = "; ".join(f"{a} ({n[a]}) vs {b} ({n[b]})" if b else f"{a} ({n[a]})"
                      for a, b in t.pairs)
    what = f"{cl['expect']} than {fmt(cl['than'])}" if "than" in cl else \
        f"{short(cl['factor'])}: {cl['expect']}"
    if "margin" in cl:
        what += f", margin {fmt(cl['margin'])}"
    where = ("; runs from " + ", ".join(" ".join(m.replace("|", "/").split())[:60]
                                        for m in t.machines)) if len(t.machines) > 1 else ""
    return f"{pairs}{': ' if 'than' in cl else '; '}{what}{where}" if pairs else f"{what}{where}"


def claims_table(grid, results, frame):
    rows = []
    for t in results:
        cl, c = t.claim, t.c
        i = col_index(grid, cl["column"])
        spec = (grid["columns"] + grid["extra"])[i].get("fmt")
        if c is None:
            ours = delta = "—"
        else:
            sides = [[s for s in (a, b) if s is not None] for a, b in c.cells]
            means = [[s.mean for s in side] for side in zip(*sides)] if c.diff is not None \
                else []
            ours = " vs ".join(fmt(sum(m) / len(m), spec) for m in means) or "—"
            ours += f" vs {fmt(cl['than'])}" if "than" in cl and means else ""
            delta = signed(c.diff, spec)
        p = "—" if t.p is None else f"{fmt(t.p, P_FMT)} ({fmt(t.p_holm, P_FMT)})"
        rows.append([cl["claim"].replace("|", "\\|"), tested_as(t, frame, i), cl["column"],
                     ours, delta, p, f"**{t.verdict}**", t.settle])
    return markdown(["claim", "tested as (runs)", "column", "ours", "Δ", "p (Holm)",
                     "verdict", "to settle"], rows)


def study_lines(grid, frame):
    """(row id, column, values, study figure, spec) of each planned row and metric column
    with a study figure and a run."""
    out = []
    for r in grid["rows"]:
        for c in grid["columns"]:
            study = r["study"].get(c["label"])
            if study is None or "metric" not in c:
                continue
            vals = values(frame, [r["id"]], col_index(grid, c["label"]))
            if vals:
                out.append((r["id"], c["label"], vals, study, c.get("fmt")))
    return out


def fixed_columns(lines):
    """Labels of the columns in which every row with 2 or more runs has one value across its
    seeds (a count or a model's size, not a measurement)."""
    same = {}
    for _, label, vals, _, _ in lines:
        if len(vals) > 1:
            same.setdefault(label, []).append(max(vals) == min(vals))
    return {label for label, s in same.items() if all(s)}


class Figure(NamedTuple):
    """One row's column against the study's figure: the prediction test, its Holm p over the
    column, the verdict, and the smallest |Δ| it would call beyond noise."""
    row: str
    label: str
    vals: list
    study: float
    spec: str | None
    c: Contrast
    p: float | None
    p_holm: float | None
    verdict: str
    needs: float | None


def figure_tests(lines):
    """Each line against the study's figure, Holm over the lines of its column; a fixed
    column's lines have no test."""
    fixed = fixed_columns(lines)
    tests = [one_run(vals, study) for _, _, vals, study, _ in lines]
    ps = [None if line[1] in fixed else p_difference(c) for line, c in zip(lines, tests)]
    adjusted, size = [None] * len(lines), {}
    for label in dict.fromkeys(line[1] for line in lines):
        idx = [k for k, line in enumerate(lines) if line[1] == label]
        for k, p in zip(idx, holm([ps[k] for k in idx])):
            adjusted[k] = p
        size[label] = len(idx)
    out = []
    for (rid, label, vals, study, spec), c, p, ph in zip(lines, tests, ps, adjusted):
        s = summarize(vals)
        if label in fixed:
            same = fmt(s.mean, spec) == fmt(study, spec)
            what = "same every seed: " + ("agrees at these digits" if same else "differs")
        elif s.n < 2:
            what = "1 run: no spread"
        else:
            what = "beyond noise" if ph < ALPHA else "within noise"
        needs = None if p is None else float(
            sp.t.ppf(1 - ALPHA / 2 / size[label], s.n - 1)) * c.se
        out.append(Figure(rid, label, vals, study, spec, c, p, ph, what, needs))
    return out


def figures_table(grid, frame):
    lines = study_lines(grid, frame)
    if not lines:
        return ["No run of a row as planned has finished yet: nothing to set against the "
                "study's figures."]
    tests = figure_tests(lines)
    rows = [[f.row, f.label, cell(f.vals, f.spec)[0], fmt(f.study, f.spec),
             signed(f.c.diff, f.spec),
             "—" if f.p is None else f"{fmt(f.p, P_FMT)} ({fmt(f.p_holm, P_FMT)})",
             f"**{f.verdict}**", "—" if f.needs is None else f"\\|Δ\\| > {fmt(f.needs, f.spec)}"]
            for f in tests if not f.verdict.startswith("same every seed")]
    head = ["row", "column", "ours", "study", "Δ", "p (Holm)", "difference",
            "beyond noise needs"]
    return (markdown(head, rows) if rows else []) + fixed_lines(tests)


def fixed_lines(tests):
    """A line per fixed column under the table: each row's one value beside the study's."""
    out = {}
    for f in (f for f in tests if f.verdict.startswith("same every seed")):
        out.setdefault(f.label, []).append(f"{f.row}: {fmt(f.vals[0], f.spec)} (study "
                                           f"{fmt(f.study, f.spec)})")
    head = ["", "One value in every seed of a row, so not tested (compared at the digits "
            "shown):", ""]
    return (head if out else []) + [f"- {k}: " + "; ".join(v) for k, v in out.items()]


def row_verdicts(grid, frame):
    """{(row id, column label): the verdict of ours against the study's figure} for the
    planned lines with a study figure and a run; 'same every seed' for a fixed column."""
    lines = study_lines(grid, frame)
    return {(f.row, f.label): f.verdict.partition(":")[0] for f in figure_tests(lines)}


def section(grid, frame):
    """The Markdown of the Conclusions: the claims, then ours against the study's figures."""
    out = ["", "## Conclusions", ""]
    if grid["claims"]:
        out += claims_table(grid, tested(grid, frame), frame)
    else:
        out += ["The grid file names no claims of the study to test (`claims:`)."]
    out += ["", "### Ours against the study's figures", ""] + figures_table(grid, frame)
    return "\n".join(out) + "\n"


def method(grid, frame):
    """The legends of the Conclusions, for the report's Method section."""
    settled = [f"**Seeds added until settled.** `--until-settled` added seeds in rounds to the "
               f"rows of open claims and looked after each: every claim's verdict is at the "
               f"per-look level {grid['claims_alpha']:.3g} (α 0.05 over the most looks, "
               f"Bonferroni), not 0.05 (search/settle.py)."] if grid.get("claims_alpha") else []
    return ([LEGEND] if grid["claims"] else []) + settled + \
        ([FIGURES_LEGEND] if study_lines(grid, frame) else [])
