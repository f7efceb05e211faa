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
import math
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


def section(grid, runs, pngs=()):
    """The search's Markdown section (empty for a grid without a search); `pngs`: its figures
    (figures())."""
    if not grid.get("search") or runs is None:
        return ""
    trials, _ = search_runs(grid, runs)
    if not trials:
        return (f"\n## Search\n\nNo trial has run yet: `python -m ablation.grid search "
                f"{grid['path']}`.\n")
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
                      "", cost, "", *table, "", *importance(grid, trials), "",
                      *(f"![{p}]({p})" for p in pngs), ""])


def full_grid_images(grid, trials):
    """Images the full grid would train (every setting, all its epochs), where the space is
    finite and a trial says how many images an epoch has."""
    every = settings(grid["search"]["space"])
    per = next((t.images // t.epochs for t in trials if t.epochs), None)
    if every is None or per is None or not trials:
        return None
    return sum(per * (s.get("train.epochs") or trials[0].planned or 0) for s in every) or None


def importance(grid, trials):
    """Lines: each param's importance over the trials that completed, by Optuna's fANOVA (a
    random forest over the trials run: an estimate from them, not a measurement of the space);
    why not, where it cannot be estimated (Optuna or scikit-learn missing, too few trials)."""
    done = [t for t in trials if t.state == "ok" and t.value is not None]
    space = grid["search"]["space"]
    if len({json.dumps(t.setting, sort_keys=True, default=str) for t in done}) < 3:
        return ["Parameter importance: not estimated (under three settings completed)."]
    try:
        import optuna
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )
        from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    except ImportError:
        return ["Parameter importance: not estimated here (it needs optuna and scikit-learn: "
                "pip install -e '.[train]')."]
    dists = {k: CategoricalDistribution(d[1]) if d[0] == "values" else
             (IntDistribution if d[4] else FloatDistribution)(d[1], d[2], log=d[3])
             for k, d in space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=grid["search"]["direction"])
    for t in done:
        study.add_trial(optuna.trial.create_trial(params=t.setting, distributions=dists,
                                                  value=t.value))
    try:
        imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as e:
        return [f"Parameter importance: not estimated ({str(e)[:200]})."]
    return ["Parameter importance (Optuna's fANOVA over the " + str(len(done)) + " completed "
            "trials: an estimate from the trials run, not a measurement of the space): "
            + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()) + "."]


def figures(grid, runs, outdir):
    """The search's PNGs beside its report: the objective by trial in the order they ran (the
    best so far as a line, pruned trials at their last epoch's figure), and parallel
    coordinates of the settings. [] for a grid without a search or trials."""
    if not grid.get("search") or runs is None:
        return []
    trials, _ = search_runs(grid, runs)
    order = sorted(trials, key=lambda t: (runs[t.name].timestamp or "", t.name))
    if not order:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ablation.report.figures import save_png
    return [save_png(plt, draw(plt, grid, order, runs), outdir,
                     f"{grid['name']}_search_{name}.png")
            for name, draw in (("history", history), ("parallel", parallel))]


def _figure_value(t, runs, grid):
    """A trial's figure; a pruned trial's is its last epoch's, from its curve or record."""
    if t.value is not None:
        return t.value
    col = column(grid)
    return (runs[t.name].values(metric_file(col, runs[t.name].params or {})) or {}).get(
        col["metric"])


def history(plt, grid, order, runs):
    fig, ax = plt.subplots(figsize=(7, 4))
    ys = [_figure_value(t, runs, grid) for t in order]
    maximize = grid["search"]["direction"] == "maximize"
    best, line = None, []
    for t, y in zip(order, ys):
        if t.state == "ok" and y is not None:
            best = y if best is None else (max(best, y) if maximize else min(best, y))
        line.append(best)
    xs = range(1, len(order) + 1)
    for state, mark in (("ok", "o"), ("pruned", "x"), ("diverged", "s")):
        pts = [(x, y) for x, t, y in zip(xs, order, ys) if t.state == state and y is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=mark, label=state)
    ax.step(list(xs), [b if b is not None else float("nan") for b in line], where="post",
            label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial, in the order they ran")
    ax.set_ylabel(grid["search"]["column"])
    ax.legend()
    ax.set_title(f"{grid['name']}: the search's trials")
    fig.tight_layout()
    return fig


def parallel(plt, grid, order, runs):
    space, fig = grid["search"]["space"], plt.figure(figsize=(8, 4))
    ax = fig.add_subplot()
    keys = list(space) + [grid["search"]["column"]]
    ys = [_figure_value(t, runs, grid) for t in order]
    lo, hi = min((y for y in ys if y is not None), default=0), max(
        (y for y in ys if y is not None), default=1)

    def pos(k, v):
        d = space.get(k)
        if d is None:  # the objective
            return 0.5 if v is None or hi == lo else (v - lo) / (hi - lo)
        if d[0] == "values":
            return d[1].index(v) / max(1, len(d[1]) - 1) if v in d[1] else 0.5
        a, b = (math.log(d[1]), math.log(d[2])) if d[3] else (d[1], d[2])
        return ((math.log(v) if d[3] else v) - a) / (b - a)
    cmap = plt.get_cmap("viridis")
    for t, y in zip(order, ys):
        pts = [pos(k, t.setting.get(k)) for k in space] + [pos(None, y)]
        ax.plot(range(len(keys)), pts, color="grey" if t.state != "ok" else cmap(pts[-1]),
                linestyle="--" if t.state != "ok" else "-", alpha=0.8)
    ax.set_xticks(range(len(keys)), [k.partition(".")[2] or k for k in keys])
    ax.set_yticks([])
    for i, k in enumerate(keys[:-1]):
        d = space[k]
        ticks = d[1] if d[0] == "values" else [d[1], d[2]]
        for v in ticks:
            ax.annotate(fmt_value(v), (i, pos(k, v)), fontsize=7, xytext=(3, 0),
                        textcoords="offset points")
    ax.annotate(f"{lo:.1f}", (len(keys) - 1, 0), fontsize=7)
    ax.annotate(f"{hi:.1f}", (len(keys) - 1, 1), fontsize=7)
    ax.set_title(f"{grid['name']}: settings and {grid['search']['column']} (dashed: pruned)")
    fig.tight_layout()
    return fig
