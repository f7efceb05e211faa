"""The report's Conclusions, computed from the recorded runs, never typed: each of the study's
claims that the grid file names (`claims:`, grid.schema) tested on our runs, and where our
runs differ from the study's figures, row by row.

A claim says what it compares: the runs of its `rows`, pooled, against those of `vs` or
against a figure (`than`), on one metric column, and what the study expected (higher, lower,
same, not higher, not lower). Only runs of a row as planned count (variants are left out).
The tests, the Holm correction and the seeds that would settle a claim are report.stats'.
"""
import json
from typing import NamedTuple

from ablation.grid.schema import relevant_keys
from ablation.report.format import markdown
from ablation.report.format import value as fmt
from ablation.report.runs import param_value, planned
from ablation.report.stats import (
    ALPHA,
    MAX_SEEDS,
    Comparison,
    compare,
    holm,
    seeds_needed,
    summarize,
)
from ablation.report.tables import cell, numbers

SIGNS = {"higher": (1,), "lower": (-1,), "same": (), "not higher": (-1,), "not lower": (1,)}
PHRASE = {"higher": "higher than", "lower": "lower than", "same": "same as",
          "not higher": "not higher than", "not lower": "not lower than"}
P_FMT = ".2g"
LEGEND = (
    "Each side of a claim pools the runs of its rows as planned, one value a run (a side of "
    "several rows carries their differences in its spread). p: two-sided Welch's t-test of the "
    "two sides (`scipy.stats.ttest_ind`, `equal_var=False`), or a one-sample t-test against a "
    "figure (`than`, `scipy.stats.ttest_1samp`); Holm p: Holm-corrected over this grid's claims "
    "that have a test. At Holm p < 0.05 the sign of Δ (rows − vs) decides: `supported` where "
    "the study claimed it (`not higher`: lower; `not lower`: higher; nothing supports `same`), "
    "`contradicted` otherwise. Otherwise, or where a side has under 2 runs: `not enough runs` "
    "(a difference within the noise settles no claim, `same` included). To settle: the seeds "
    "(runs) n a side at which a Welch test at the observed means and sample stds would give "
    "p < 0.05 / M, M the claims of this grid (under that level Holm rejects whatever the other "
    "claims give): t = |Δ| / √((sd₁² + sd₂²) / n), df = (n − 1)(sd₁² + sd₂²)² / "
    "(sd₁⁴ + sd₂⁴), p = 2 · P(T_df > t); against a figure t = |Δ| / (sd / √n), df = n − 1; a "
    "side with 1 run takes the other side's sd; (+k ROWS): the runs those rows still lack. "
    "Where a claim's runs ran on more than one machine, `rows differ in` names them: a timing "
    "difference then holds the machines' difference too.")
FIGURES_LEGEND = (
    "Ours against the study's single figure, row by row (the study does not claim these): a "
    "one-sample t-test of our seeds against its figure (`scipy.stats.ttest_1samp`, two-sided), "
    "Holm-corrected over the rows of each column; `beyond noise` at Holm p < 0.05 (the figure "
    "then lies outside our interval too). To settle: the seeds at which p < 0.05 / M (M: the "
    "column's lines here), by the formula above. A column in which every row with 2 or more "
    "runs gives the same value each seed (a count, a model's size) is compared at the digits "
    "shown, not tested.")


class Tested(NamedTuple):
    """One claim and what the runs say: its comparison, Holm p, verdict, what would settle it,
    and the machines its runs ran on."""
    claim: dict
    c: Comparison
    p_holm: float | None
    verdict: str
    settle: str
    machines: tuple = ()


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


def verdict(expect, diff, p_holm):
    if p_holm is None or p_holm >= ALPHA:
        return "not enough runs"
    return "supported" if (1 if diff > 0 else -1) in SIGNS[expect] else "contradicted"


def side_name(ids):
    return ", ".join(ids)


def settle(c, names, level):
    """What would settle a comparison: the runs it lacks, or the seeds (a side, for two
    sides) at which its difference would reach p < `level` (names: each side's)."""
    sides = [s for s in (c.a, c.b) if s is not None]
    each = " a side" if len(sides) == 2 else ""
    if c.diff is None:
        return "no runs yet of " + " and ".join(n for n, s in zip(names, sides) if s.n == 0)
    if all(s.sd is None for s in sides):
        return f"2 seeds or more{each} (no spread yet)"
    if c.diff == 0:
        return "no difference seen"
    n = seeds_needed(c, level)
    if n is None:
        return f"over {MAX_SEEDS} seeds{each}"
    more = [f"+{n - s.n} {name}" for name, s in zip(names, sides) if n > s.n]
    return (f"{n} seeds{each}" + (f" ({'; '.join(more)})" if more else "")
            + (", taking the other side's sd" if any(s.sd is None for s in sides) else ""))


def differences(grid, a, b):
    """The params (short names) whose planned values differ between rows `a` and `b`, and
    those that vary within the rows without telling the sides apart."""
    rows = {r["id"]: r["params"] for r in grid["rows"]}
    keys = [k for k in relevant_keys(grid) if not k.endswith(".seed")]

    def seen(ids, k):
        return {json.dumps(param_value(rows[i], k), sort_keys=True, default=str) for i in ids}
    differ = [k for k in keys if b and seen(a, k) != seen(b, k)]
    within = [k for k in keys if k not in differ and len(seen(a + b, k)) > 1]
    text = ", ".join(k.partition(".")[2] for k in differ) or "—"
    if within:
        text += "; varied within: " + ", ".join(k.partition(".")[2] for k in within)
    return text


def tested(grid, frame):
    """Each claim of the grid tested on the runs, Holm-corrected together."""
    tests = []
    for cl in grid["claims"]:
        i = col_index(grid, cl["column"])
        if "vs" in cl:
            tests.append(compare(values(frame, cl["rows"], i), values(frame, cl["vs"], i)))
        else:
            tests.append(compare(values(frame, cl["rows"], i), figure=cl["than"]))
    adjusted = holm([c.p for c in tests])
    level = ALPHA / max(len(tests), 1)
    out = []
    for cl, c, p in zip(grid["claims"], tests, adjusted):
        sides = [side_name(cl["rows"])] + ([side_name(cl["vs"])] if "vs" in cl else [])
        v = verdict(cl["expect"], c.diff, p)
        i = col_index(grid, cl["column"])
        ran_on = tuple(sorted(machines(frame, cl["rows"] + cl.get("vs", []), i)))
        out.append(Tested(cl, c, p, v, "—" if v != "not enough runs" else
                          settle(c, sides, level), ran_on))
    return out


def claims_table(grid, results):
    rows = []
    for t in results:
        cl, c = t.claim, t.c
        spec = next(col for col in grid["columns"] + grid["extra"]
                    if col["label"] == cl["column"]).get("fmt")
        other = f"{side_name(cl['vs'])} ({c.b.n})" if "vs" in cl else fmt(cl["than"])
        ours = fmt(c.a.mean, spec) + " vs " + (fmt(c.b.mean, spec) if "vs" in cl
                                               else fmt(cl["than"]))
        rows.append([
            cl["claim"].replace("|", "\\|"),
            f"{side_name(cl['rows'])} ({c.a.n}) {PHRASE[cl['expect']]} {other}",
            differences(grid, cl["rows"], cl.get("vs", [])) + (
                f"; runs from {len(t.machines)} machines: "
                + ", ".join(" ".join(m.replace("|", "/").split())[:80] for m in t.machines)
                if len(t.machines) > 1 else ""), cl["column"], ours,
            signed(c.diff, spec), fmt(c.p, P_FMT), fmt(t.p_holm, P_FMT), f"**{t.verdict}**",
            t.settle])
    return markdown(["claim", "as tested (runs)", "rows differ in", "column", "ours", "Δ", "p",
                     "Holm p", "verdict", "to settle"], rows)


def signed(x, spec=None):
    return fmt(x, "+" + (spec or ".4g"))


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


def figure_tests(lines):
    """Each line's comparison with the study's figure, and its p Holm-corrected over the
    lines of its column; a fixed column's lines have no test."""
    fixed = fixed_columns(lines)
    tests = [Comparison(summarize(vals), None, study, summarize(vals).mean - study, None)
             if label in fixed else compare(vals, figure=study)
             for _, label, vals, study, _ in lines]
    adjusted, size = [None] * len(lines), {}
    for label in dict.fromkeys(line[1] for line in lines):
        idx = [k for k, line in enumerate(lines) if line[1] == label]
        for k, p in zip(idx, holm([tests[k].p for k in idx])):
            adjusted[k] = p
        size[label] = len(idx)
    return tests, adjusted, fixed, size


def figures_table(grid, frame):
    lines = study_lines(grid, frame)
    if not lines:
        return ["No run of a row as planned has finished yet: nothing to set against the "
                "study's figures."]
    tests, adjusted, fixed, size = figure_tests(lines)
    rows = []
    for (rid, label, vals, study, spec), c, p in zip(lines, tests, adjusted):
        more = "—"
        if label in fixed:
            same = fmt(c.a.mean, spec) == fmt(study, spec)
            what = "same every seed: " + ("agrees at these digits" if same else "differs")
        elif c.a.n < 2:
            what, more = "1 run: no spread", settle(c, [rid], ALPHA)
        else:
            what = "beyond noise" if p < ALPHA else "within noise"
            more = "—" if p < ALPHA else settle(c, [rid], ALPHA / size[label])
        rows.append([rid, label, cell(vals, spec)[0], fmt(study, spec), signed(c.diff, spec),
                     fmt(c.p, P_FMT), fmt(p, P_FMT), f"**{what}**", more])
    return markdown(["row", "column", "ours", "study", "Δ", "p", "Holm p", "difference",
                     "to settle"], rows)


def section(grid, frame):
    """The Markdown of the Conclusions: the claims, then ours against the study's figures."""
    out = ["", "## Conclusions", ""]
    if grid["claims"]:
        out += claims_table(grid, tested(grid, frame)) + ["", LEGEND]
    else:
        out += ["The grid file names no claims of the study to test (`claims:`)."]
    out += ["", "### Ours against the study's figures", ""] + figures_table(grid, frame)
    if study_lines(grid, frame):
        out += ["", FIGURES_LEGEND]
    return "\n".join(out) + "\n"
