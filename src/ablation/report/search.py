"""A search's section of its grid's report, from the record alone: the trials (state, setting,
figure, epochs run, images trained), the compute spent against the full grid's, and the
confirmation: the best settings at new seeds, the best against each other.

The confirmation's method: the settings whose record holds two or more confirmation runs
(seeds 1..n, train.trial null) are ranked by their mean; the best is tested against each other
one with Welch's t-test (report.stats.contrast over one pair) for a difference and with two
one-sided tests for equivalence within the grid file's search.margin; Holm over the others
(each family apart). The best `beats` the runner-up where the difference is significant in the
search's direction, is `equivalent` where the TOST is, else `not enough runs`. The fall from the
search: the best trial's figure (one seed, picked as the best: biased upward) less its
setting's confirmed mean.
"""
import json
import os
from typing import NamedTuple

from ablation.grid.schema import metric_file
from ablation.grid.space import settings
from ablation.record.run import RunId, is_number
from ablation.report.format import markdown
from ablation.report.stats import contrast, holm, p_difference, p_equivalence, summarize
from ablation.training.overrides import fmt_value, get

ALPHA = 0.05


class Trial(NamedTuple):
    name: str
    row: str
    setting: dict
    state: str  # ok, pruned, diverged
    value: float | None
    epochs: int | None
    images: int
    planned: int | None  # its train.epochs


def settle_path(grid, folder="reports"):
    """Where `--until-settled` records the level its looks were tested at."""
    return os.path.join(folder, f"{grid['name']}.settle.json")


def settled_level(grid, folder="reports"):
    """The per-look level a grid settled with `--until-settled` is judged at (its record,
    search/settle.py); None where it never was or the file is unreadable."""
    try:
        with open(settle_path(grid, folder)) as f:
            level = json.load(f).get("level")
    except (OSError, ValueError, AttributeError):
        return None
    return level if isinstance(level, float) and 0 < level <= ALPHA else None


def column(grid):
    return next(c for c in grid["columns"] + grid["extra"]
                if c["label"] == grid["search"]["column"])


def search_runs(grid, runs):
    """(trials, {row: [confirmation values]}) of the grid's search in `runs` ({name: Run})."""
    col, space = column(grid), list(grid["search"]["space"])
    trials, confirmed = [], {}
    for name, run in sorted(runs.items()):
        rid = RunId.parse(name)
        if rid is None or rid.stage is not None or rid.grid != grid["name"] or \
                rid.variant != grid["variant"] or not rid.row.startswith("t") or \
                not run.finished:
            continue
        path = metric_file(col, run.params or {})
        values = run.values(path) if path else {}
        v = values.get(col["metric"])
        if get(run.params, "train.trial"):
            state = "pruned" if values.get("pruned") else "diverged" if values.get(
                "diverged") else "ok"
            trials.append(Trial(name, rid.row, {k: get(run.params, k) for k in space}, state,
                                v if is_number(v) else None, values.get("epochs_completed"),
                                (values.get("train_images") or 0) *
                                (values.get("epochs_completed") or 0),
                                get(run.params, "train.epochs")))
        elif rid.seed and is_number(v):
            confirmed.setdefault(rid.row, []).append(v)
    return trials, confirmed


class Confirmation(NamedTuple):
    ranked: list  # [(row, Summary, trial figure)] best first
    tests: list  # [(row, Δ best − it, Holm p difference, Holm p equivalence)]
    verdict: str
    fall: float | None  # the best trial's figure less its setting's confirmed mean


def confirmation(grid, runs, study=None):
    """The verdict on the confirmed settings (module docstring); `study` is not needed."""
    trials, confirmed = search_runs(grid, runs)
    maximize = grid["search"]["direction"] == "maximize"
    figure = {t.row: t.value for t in trials if t.state == "ok"}
    ranked = sorted(((row, summarize(v), figure.get(row)) for row, v in confirmed.items()
                     if len(v) >= 2), key=lambda r: r[1].mean, reverse=maximize)
    if len(ranked) < 2:
        return Confirmation(ranked, [], "not confirmed: under two settings have two or more "
                                        "confirmation runs", None)
    best = confirmed[ranked[0][0]]
    cs = [contrast([(best, confirmed[row])]) for row, _, _ in ranked[1:]]
    hd = holm([p_difference(c) for c in cs])
    he = holm([p_equivalence(c, grid["search"]["margin"]) for c in cs])
    tests = [(row, c.diff, d, e) for (row, _, _), c, d, e in zip(ranked[1:], cs, hd, he)]
    _, diff, d, e = tests[0]
    better = diff > 0 if maximize else diff < 0
    verdict = "beats the runner-up" if d is not None and d < ALPHA and better else \
        "equivalent to the runner-up" if e is not None and e < ALPHA else \
        "not enough runs to tell it from the runner-up"
    top = max(figure.items(), key=lambda kv: kv[1] if maximize else -kv[1], default=None)
    fall = top[1] - summarize(confirmed[top[0]]).mean if top and top[0] in confirmed and \
        len(confirmed[top[0]]) >= 2 else None
    return Confirmation(ranked, tests, verdict, fall)


def verdict_lines(conf):
    """What the search's driver prints and the report's section opens with."""
    if not conf.tests:
        return [conf.verdict]
    row, s, fig = conf.ranked[0]
    out = [f"best confirmed: {row}, {s.mean:.2f} [{s.lo:.2f} – {s.hi:.2f}] (n={s.n}): "
           f"{conf.verdict}"]
    for other, diff, d, e in conf.tests:
        out.append(f"  vs {other}: Δ {diff:+.2f}, Holm p {fmt_p(d)} (difference), "
                   f"{fmt_p(e)} (equivalence)")
    if conf.fall is not None:
        out.append(f"the search's best figure fell by {conf.fall:.2f} at new seeds "
                   f"(the winner's curse: one seed, picked as the best)")
    return out


def fmt_p(p):
    return "—" if p is None else f"{p:.3g}"


def section(grid, runs):
    """The search's Markdown section (empty for a grid without a search)."""
    if not grid.get("search") or runs is None:
        return ""
    trials, _ = search_runs(grid, runs)
    space, col = list(grid["search"]["space"]), column(grid)
    rows = [[t.name, t.state] + [fmt_value(t.setting[k]) for k in space] +
            [f"{t.value:.2f}" if t.value is not None else "—", str(t.epochs or 0),
             f"{t.images:,}"] for t in trials]
    table = markdown(["trial", "state"] + space + [col["label"], "epochs", "images"], rows)
    spent = sum(t.images for t in trials)
    full = full_grid_images(grid, trials)
    cost = f"Trials trained {spent:,} images" + (
        f", {spent / full:.0%} of the full grid's {full:,}" if full else "") + "."
    conf = confirmation(grid, runs)
    head, *rest = verdict_lines(conf)
    return "\n".join(["", "## Search", "", f"**{head}**", "", *(f"- {x.strip()}" for x in rest),
                      "", cost, "", *table, ""])


def full_grid_images(grid, trials):
    """Images the full grid would train (every setting, all its epochs), where the space is
    finite and a trial says how many images an epoch has."""
    every = settings(grid["search"]["space"])
    per = next((t.images // t.epochs for t in trials if t.epochs), None)
    if every is None or per is None or not trials:
        return None
    return sum(per * (s.get("train.epochs") or trials[0].planned or 0) for s in every) or None
