"""`python -m ablation.report.compare [BASE] [TARGET] [--out compare.md]`: one Markdown comment
for a pull request. BASE (default main), TARGET (default the workspace): git revisions or DVC
experiment names. First a verdict line (the changes beyond seed noise, how many were judged and
why others were not); what changed (code and the stages it feeds, pins, dvc.lock, grids, params),
the machines where the two sides ran on different ones, the metrics that matter with Δ, each
change judged against the seed noise of the record (report.stats), the study's figures where
TARGET runs a grid row, and a PNG of both sides' per-epoch test accuracy. Needs no torch: the
base install (`pip install .`) runs it."""
import glob
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from ablation.core.cli import Parser, UserError, bounded, run
from ablation.core.io import check_outputs, replace_atomic
from ablation.core.outputs import parse_metrics_path
from ablation.grid.schema import differences, load, metric_file, relevant_keys
from ablation.record.dvc import dvc
from ablation.record.run import DERIVED, RunId, busy
from ablation.report import changes
from ablation.report.curves import curves, family, plot
from ablation.report.format import is_number, markdown, value
from ablation.report.stats import change_against_noise
from ablation.training.overrides import fmt_value

WORKSPACE = "workspace"
ROWS = {  # per metrics family: (metric key, label, format, Δ as: abs | % (relative) | pp)
    "resnet": (("test_accuracy", "test accuracy %", ".2f", "abs"),
               ("train_time_ms", "train time ms", ",.0f", "%"),
               ("images_per_s", "images/s", ",.1f", "%"),
               ("data_wait_pct", "data wait % of train time", ".2f", "pp")),
    "svm": (("test_accuracy", "test accuracy %", ".2f", "abs"),
            ("train_time_ms", "train time ms", ",.0f", "%")),
}
TIMING = {"train_time_ms", "images_per_s", "data_wait_pct"}  # move with the machine


def q(text, limit=80):  # text from a file or the user: bounded, safe in a Markdown table
    return changes.safe(text, limit)


def resolve(rev):
    """(commit, is an experiment) of a git revision or DVC experiment name (newest of it)."""
    r = changes.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if r.returncode == 0:
        return r.stdout.strip(), False
    refs = changes.git("for-each-ref", "--sort=-committerdate", "--format=%(objectname) %(refname)",
               "refs/exps").stdout.splitlines()
    for sha, _, ref in (line.partition(" ") for line in refs):
        parts = ref.split("/")  # refs/exps/<2 hex>/<38 hex>/<name>; refs/exps/exec/*: DVC's own
        if len(parts) == 5 and parts[2] != "exec" and parts[4] == rev:
            return sha, True
    raise UserError(f"unknown revision or experiment {bounded(repr(rev), 80)} (neither a git "
                    f"revision nor the name of a DVC experiment here)")


def dvc_json(*args):
    r = dvc([*args, "--json"])
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"dvc {' '.join(args[:2])} failed: {bounded(last, 200)}")
    return json.loads(r.stdout or "{}")  # DVC writes a NaN metric as NaN; json.loads reads it


def finite(v):
    """A number that is finite (and fits a float: a 400-digit integer from a file does not)."""
    try:
        return is_number(v) and math.isfinite(v)
    except OverflowError:
        return False


def fmt(v, spec):
    """A cell: numbers by `spec` (report.format), text from a file quoted as code."""
    return value(v, spec) if v is None or is_number(v) else f"`{q(v, 40)}`"


def delta(old, new, spec, how):
    if not (finite(old) and finite(new)):
        return "—"
    if how == "%":
        return f"{100.0 * (new - old) / old:+.1f} %" if old else "—"
    return ("+" if new >= old else "") + format(new - old, spec) + (" pp" if how == "pp" else "")


def sides(d, key):
    """(old, new) of one metric in a file's `dvc metrics diff` entry; data_wait_pct derived."""
    if key in DERIVED:
        return tuple(DERIVED[key]({"data_wait_ms": w, "train_time_ms": t})
                     for w, t in zip(sides(d, "data_wait_ms"), sides(d, "train_time_ms")))
    e = d.get(key) or {}  # DVC leaves out a key whose value is null on both sides
    return e.get("old"), e.get("new")


def study_match(name, is_exp, params):
    """(grid, row, why) of the first grid row TARGET runs: by its experiment name, else by its
    params (equal to the row's over every key the grid's stages read, seeds aside); or None."""
    grids = [load(p) for p in sorted(glob.glob("grids/*.yaml"))]
    rid = RunId.parse(name) if is_exp else None
    for g in grids:
        for r in g["rows"]:
            if rid is not None and rid.stage is None and rid.of_row(g["name"], r["id"]):
                diff = ", ".join(f"{k} {q(fmt_value(v), 40)}" for k, v in differences(
                    params, r["params"], relevant_keys(g)).items())
                return g, r, "by experiment name" + (
                    f"; its params differ from the row's plan: {diff}" if diff else "")
    for g in grids:
        keys = relevant_keys(g)
        for r in g["rows"]:
            if all(k.partition(".")[2] in (params.get(k.partition(".")[0]) or {}) for k in keys) \
                    and not differences(params, r["params"], keys):
                return g, r, "its params are the row's"
    return None


def study_figures(match, params):
    """{(metrics file, key): (value, label, fmt)} of the matched row's study figures."""
    g, r, _ = match or (None, {"study": {}}, None)
    return {(metric_file(c, params), c["metric"]): (r["study"][c["label"]], c["label"],
                                                       c.get("fmt") or ".4g")
            for c in (g or {}).get("columns", []) if c["label"] in r["study"]}


def params_section(diff, b, t):
    rows = [[f"`{q(f, 60)}` `{q(k, 60)}`", fmt(e.get("old"), str), fmt(e.get("new"), str)]
            for f, keys in sorted(diff.items()) for k, e in sorted(keys.items())]
    return ["### Params changed", ""] + markdown(["param", b, t], rows) if rows else []


NOT_JUDGED = {  # Judgement.reason: (its cell in the table, what the verdict line says)
    "no seeds": ("no seeds on record", "not judged: no seeds on record"),
    "unknown": ("configuration unknown: not judged", "not judged: configuration unknown"),
    "machines differ": ("not comparable: machines differ", "not comparable: machines differ"),
    "no machine": ("machine not on record: timing not judged",
                   "not judged: machine not on record"),
    "busy": ("machine busy: timing not judged", "not judged: machine busy"),
}


class Judgement(NamedTuple):
    """One metric's change against seed noise (Context.noise). verdict: 'beyond noise' or
    'within noise' (report.stats.change_against_noise), None where not judged, `reason` (a key
    of NOT_JUDGED) then saying why; diff: new - old; p: two-sided; sd and n: the seeds'."""
    verdict: str | None
    diff: float
    p: float | None = None
    reason: str | None = None
    sd: float | None = None
    n: int = 0

    def cell(self):
        if self.verdict is not None:
            return f"{self.verdict} (seed sd {self.sd:.3g}, n={self.n}, p {self.p:.2g})"
        return NOT_JUDGED[self.reason][0] + (f" ({self.n} run)" if self.n else "")


class Context:
    """What the metrics table reads besides `dvc metrics diff`: both sides' commits (None:
    the workspace), their params, the stages' param keys, the recorded seed runs, and the
    metrics files TARGET (an experiment) produced."""

    def __init__(self, base_c, target_c, is_exp, base_params, target_params):
        self.commits = (base_c, target_c)
        self.params = (base_params, target_params)
        dvc_yaml = changes.read_at(target_c, "dvc.yaml") or changes.read_at(base_c, "dvc.yaml")
        self.keys = changes.stage_params(dvc_yaml)
        # the base's record first: a pull request adds seeds, it does not replace main's
        self.runs = changes.recorded_runs([base_c, target_c] + ([None] if target_c else []))
        self.produced = changes.produced(target_c, is_exp)
        self.inherited = set()  # files shown as inherited (metrics_section fills it)

    def machines(self, path):
        return tuple(changes.machine(changes.record(c, path)) for c in self.commits)

    def noise(self, path, key, old, new, machines):
        """One metric's change judged against seed noise; None where there is no change to
        judge (a side's value missing or not finite)."""
        if not (finite(old) and finite(new)):
            return None
        diff, same = float(new) - float(old), None
        if key in TIMING:
            if None in machines:
                return Judgement(None, diff, reason="no machine")
            if changes.differ(*machines):
                return Judgement(None, diff, reason="machines differ")
            if any(busy(changes.record(c, path)) for c in self.commits):
                return Judgement(None, diff, reason="busy")
            same = machines[0]
        unit = parse_metrics_path(path)
        keys = self.keys.get(unit[0], []) if unit else []
        timing = key in TIMING
        seeds = changes.seeds_of(self.runs, path, key, self.params[0], keys, same, timing)
        if seeds is not None and len(seeds) < 2:
            seeds = changes.seeds_of(self.runs, path, key, self.params[1], keys, same, timing)
        if seeds is None:
            return Judgement(None, diff, reason="unknown")
        if len(seeds) < 2:
            return Judgement(None, diff, reason="no seeds", n=len(seeds))
        n = change_against_noise(seeds, old, new)
        return Judgement(n.verdict, n.diff, n.p, None, n.base.sd, n.base.n)


class Judged(NamedTuple):
    """A row of the metrics table that was judged or said why not: where, and its Δ cell."""
    path: str
    label: str
    delta: str
    judgement: Judgement


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def verdict(judged, most=3):
    """The comment's first line, from the metrics table's judgements: the changes beyond seed
    noise (the first `most`, then how many more), how many were judged, and how many were
    not and why."""
    beyond = [j for j in judged if j.judgement.verdict == "beyond noise"]
    n = sum(j.judgement.verdict is not None for j in judged)
    why = Counter(j.judgement.reason for j in judged if j.judgement.verdict is None)
    tail = [plural(n, "metric") + " judged"] if n else []
    tail += [plural(why[r], "timing" if r in ("machines differ", "no machine") else "metric")
             + " " + NOT_JUDGED[r][1] for r in NOT_JUDGED if r in why]
    tail = f" ({'; '.join(tail)})" if tail else ""
    if not judged:
        return ("**Verdict: no change to judge against seed noise** (no metric with a value on "
                "both sides)")
    if not n:
        return f"**Verdict: no change judged against seed noise**{tail}"
    if not beyond:
        return f"**Verdict: no change beyond seed noise**{tail}"
    said = [f"{j.label} of `{q(j.path, 100)}` ({j.delta}, p {j.judgement.p:.2g})"
            for j in beyond[:most]]
    if len(beyond) > most:
        said.append(f"{len(beyond) - most} more")
    said = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
    return f"**Verdict: {said} moved beyond seed noise**{tail}"


def metrics_section(diff, b, t, study, ctx):
    """(the Markdown lines of the metrics table, [Judged] of its rows)."""
    head = ["file", "metric", b, t, "Δ", "against seed noise"] + ["study"] * bool(study)
    rows, judged = [], []
    for path in sorted(p for p in diff if family(p)):
        d = diff[path]
        state = "new" if all(e.get("old") is None for e in d.values()) else \
            "removed" if all(e.get("new") is None for e in d.values()) else ""
        if not state and ctx.produced is not None and path not in ctx.produced:
            state = "inherited"  # the experiment did not run it: its parent's numbers
            ctx.inherited.add(path)
        machines = ctx.machines(path)
        ours = ROWS[family(path)]
        lines = list(ours) + [(k, label, spec, "abs") for (p, k), (_, label, spec) in
                              study.items() if p == path and k not in {x[0] for x in ours}]
        for i, (key, label, spec, how) in enumerate(lines):
            old, new = sides(d, key)
            name = f"`{q(path, 100)}`" + (f" ({state})" if state else "")
            change = state or delta(old, new, spec, how)
            j = None if state else ctx.noise(path, key, old, new, machines)
            if j is not None:
                judged.append(Judged(path, label, change, j))
            cells = ["" if i else name, label, fmt(old, spec),
                     "—" if state == "inherited" else fmt(new, spec), change,
                     "" if j is None else j.cell()]
            if study:
                cells.append(fmt(study[(path, key)][0], spec) if (path, key) in study else "")
            rows.append(cells)
    if not rows:
        return ["### Metrics", "", "No metrics files on either side."], judged
    return ["### Metrics", ""] + markdown(head, rows), judged


def machines_note(diff, ctx, b, t):
    """Where the two sides' runs recorded different machines: one paragraph that says so,
    right after the verdict; [] where they agree (or records are missing)."""
    pairs = {m for p in diff if family(p) for m in [ctx.machines(p)] if changes.differ(*m)}
    if not pairs:
        return []
    pairs = sorted(pairs, key=str)
    said = "; ".join(f"{b} on `{q(changes.describe(x), 120)}`, {t} on "
                     f"`{q(changes.describe(y), 120)}`" for x, y in pairs[:3]) + (
        f"; and {len(pairs) - 3} more pairs" if len(pairs) > 3 else "")
    return [f"**The two sides ran on different machines** ({said}): timing changes "
            "(train time, images/s, data wait) say as much about the machines as about the "
            "change, and are marked not comparable.", ""]


def paths_note(diff, ctx, b, t):
    """Where both sides' run records name their small-map kernel paths and these differ: one
    paragraph saying so, after the machines' (a path change moves accuracy like a seed; the
    same CPU model chose other paths on two VMs, docs/measurements.md 2026-12-06)."""
    apart = {}
    for p in sorted(p for p in diff if family(p)):
        sides = [changes.kernel_paths(changes.record(c, p)) for c in ctx.commits]
        if None not in sides and sides[0] != sides[1]:
            apart[p] = [f"`{x}` on the matmul path in {b if x in sides[0] else t} only"
                        for x in sorted(set(sides[0]) ^ set(sides[1]))]
    if not apart:
        return []
    said = "; ".join(f"`{q(p, 100)}`: " + ", ".join(d[:4])
                     + (f" and {len(d) - 4} more" if len(d) > 4 else "")
                     for p, d in list(apart.items())[:3])
    return [f"**The two sides' small-map kernel paths differ** ({said}): `train.small_maps: "
            "auto` chose them by timing, and another path reorders floating-point sums, which "
            "moves accuracy about as much as another seed does: an accuracy change here is the "
            "code's and the paths' together (pin `train.small_maps` on both sides to tell them "
            "apart).", ""]


def inherited_note(ctx, t):
    if not ctx.inherited:
        return []
    return ["", f"`inherited`: a run {t} did not produce (not in its dvc.lock): the numbers "
            "are its parent commit's, not a result of this experiment, so no Δ."]


NOISE = ("Against seed noise: the change of one run against one run, judged with the spread "
         "of the recorded seeds of that configuration (reports/*.json: runs whose params equal "
         "one side's but for the seed; timings only from runs on the same machine whose record "
         "says no other process kept over 0.25 cores busy): two "
         "single runs differ by sd·√2, t = Δ / (sd·√2) with n − 1 degrees of freedom, "
         "two-sided, beyond noise at p < 0.05 (report.stats.change_against_noise).")


def side_params(commit):
    """The params.yaml a side ran with ({} where it is missing or not a mapping)."""
    params = changes.load_yaml(changes.read_at(commit, "params.yaml"))
    return {k: v for k, v in params.items() if isinstance(k, str) and isinstance(v, dict)}


def main(base="main", target=WORKSPACE, out=None, plot_path=None, plot_link=None):
    """The Markdown comparing `target` with `base`; also written to `out` (atomically), with
    the accuracy plot at `plot_path` (default: compare.png beside `out`)."""
    plot_path = plot_path or (out and os.path.join(os.path.dirname(out), "compare.png"))
    check_outputs(out, plot_path)
    base_c, _ = resolve(base)
    target_c, is_exp = (None, False) if target == WORKSPACE else resolve(target)
    revs = [base_c] + ([target_c] if target_c else [])  # one revision: against the workspace
    pdiff = dvc_json("params", "diff", *revs)
    mdiff = dvc_json("metrics", "diff", *revs, "--all")  # --all: unchanged metrics too
    b, t = f"`{q(base, 60)}`", f"`{q(target, 60)}`"
    params = side_params(target_c)
    match = study_match(target, is_exp, params)
    ctx = Context(base_c, target_c, is_exp, side_params(base_c), params)
    changed = sum(len(keys) for keys in pdiff.values())
    table, judged = metrics_section(mdiff, b, t, study_figures(match, params), ctx)
    md = [f"## Results: {b} → {t}", "", verdict(judged), ""] + machines_note(mdiff, ctx, b, t)
    md += paths_note(mdiff, ctx, b, t)
    md += ["### What changed", ""] + changes.what_changed(base_c, target_c, changed) + [""]
    md += params_section(pdiff, b, t) + [""] * bool(changed)
    if match:
        md += [f"Study figures: `grids/{match[0]['name']}.yaml`, row `{match[1]['id']}` "
               f"({match[2]}).", ""]
    md += table
    md += ["", NOISE] + inherited_note(ctx, t)
    data = curves([base_c, target_c], mdiff, ctx.inherited)
    if data and plot_path:
        plot(data, [bounded(base, 40), bounded(target, 40)], plot_path)
        what = f"Per-epoch test accuracy, {q(base, 40)} vs {q(target, 40)}"
        rel = os.path.relpath(plot_path, os.path.dirname(out) or ".") if out else plot_path
        md += ["", f"[{what} (PNG)]({plot_link})" if plot_link else f"![{what}]({rel})"]
    text = "\n".join(md) + "\n"
    if out:
        replace_atomic(lambda tmp: Path(tmp).write_text(text), out)
    return text


def _cli(argv):
    ap = Parser(prog="python -m ablation.report.compare",
                description="One Markdown comment comparing two versions of the results: "
                            "changed params, key metrics with Δ, the study, accuracy curves.")
    for arg, default in (("base", "main"), ("target", WORKSPACE)):
        ap.add_argument(arg, nargs="?", default=default,
                        help=f"git revision or DVC experiment name (default: {default})")
    ap.add_argument("--out", help="also write the Markdown to this file (atomically)")
    ap.add_argument("--plot", help="where to write the accuracy PNG (default: compare.png "
                                   "beside --out; no PNG without either)")
    ap.add_argument("--plot-link", help="URL the Markdown links for the PNG, e.g. the CI run "
                                        "that holds it (default: embed it by relative path)")
    a = ap.parse_args(argv)
    print(main(a.base, a.target, a.out, a.plot, a.plot_link), end="")


if __name__ == "__main__":
    run(_cli)
