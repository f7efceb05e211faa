"""`python -m ablation.report.compare [BASE] [TARGET] [--out compare.md]`: one Markdown comment
for a pull request. BASE (default main), TARGET (default the workspace): git revisions or DVC
experiment names. Changed params, the metrics that matter with Δ, the study's figures where
TARGET runs a grid row, and a PNG of both sides' per-epoch test accuracy."""
import glob
import json
import math
import os
import subprocess
from pathlib import Path

import yaml

from ablation.core.cli import Parser, UserError, bounded, run
from ablation.core.io import check_outputs, replace_atomic
from ablation.core.outputs import FAMILY, parse_metrics_path
from ablation.grid.schema import differences, load, metric_file, relevant_keys
from ablation.record.dvc import dvc
from ablation.record.run import DERIVED, RunId
from ablation.record.store import git_show, read_curve
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


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True)


def q(text, limit=80):  # text from a file or the user: bounded, safe in a Markdown table
    return bounded(text, limit).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def resolve(rev):
    """(commit, is an experiment) of a git revision or DVC experiment name (newest of it)."""
    r = git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if r.returncode == 0:
        return r.stdout.strip(), False
    refs = git("for-each-ref", "--sort=-committerdate", "--format=%(objectname) %(refname)",
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


def read_at(commit, path):  # a file's text at a commit (None: the workspace), or None
    if commit is None:
        return Path(path).read_text(errors="replace") if Path(path).is_file() else None
    return git_show(commit, path)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v, spec):
    if v is None or not is_num(v):
        return "—" if v is None else f"`{q(v, 40)}`"
    return format(v, spec) if math.isfinite(v) else {"nan": "NaN"}.get(str(v), str(v))


def delta(old, new, spec, how):
    if not (is_num(old) and is_num(new) and math.isfinite(old) and math.isfinite(new)):
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


def family(path):  # 'resnet', 'svm' or None, from a metrics file's path
    unit = parse_metrics_path(path)
    return FAMILY[unit[0]] if unit else None


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
    rows = [f"| `{q(f, 60)}` `{q(k, 60)}` | {fmt(e.get('old'), '')} | {fmt(e.get('new'), '')} |"
            for f, keys in sorted(diff.items()) for k, e in sorted(keys.items())]
    if not rows:
        return ["### Params", "", "No params changed."]
    return ["### Params changed", "", f"| param | {b} | {t} |", "|---|---|---|", *rows]


def metrics_section(diff, b, t, study):
    out = ["### Metrics", "", f"| file | metric | {b} | {t} | Δ |" + (" study |" * bool(study)),
           "|---" * (5 + bool(study)) + "|"]
    for path in sorted(p for p in diff if family(p)):
        d = diff[path]
        state = "new" if all(e.get("old") is None for e in d.values()) else \
            "removed" if all(e.get("new") is None for e in d.values()) else ""
        ours = ROWS[family(path)]
        rows = list(ours) + [(k, label, spec, "abs") for (p, k), (_, label, spec) in study.items()
                             if p == path and k not in {x[0] for x in ours}]
        for i, (key, label, spec, how) in enumerate(rows):
            old, new = sides(d, key)
            cells = ["" if i else f"`{q(path, 100)}`" + (f" ({state})" if state else ""), label,
                     fmt(old, spec), fmt(new, spec), state or delta(old, new, spec, how)]
            if study:
                cells.append(fmt(study[(path, key)][0], spec) if (path, key) in study else "")
            out.append("| " + " | ".join(cells) + " |")
    return out if len(out) > 4 else ["### Metrics", "", "No metrics files on either side."]


def curves(commits, diff):
    """{run: [(epochs, accuracies) per side]} from each ResNet run's test/accuracy.tsv, on the
    sides where DVC sees the run's metrics file (a stale file left in a commit is not a run)."""
    out = {}
    for path in sorted(p for p in diff if family(p) == "resnet"):
        stem, pts = path[:-len(".json")], []
        for c, side in zip(commits, ("old", "new")):
            try:
                if all(e.get(side) is None for e in diff[path].values()):
                    raise ValueError(side)
                curve = read_curve(c, path)
                pts.append((list(curve), list(curve.values())))
            except ValueError:  # no run, or not dvclive's two columns: no curve on that side
                pts.append(([], []))
        if any(x for x, _ in pts):
            out[stem.removeprefix("metrics/resnet/")] = pts
    return out


def plot(data, labels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    n, cols = len(data), min(len(data), 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, pts) in zip(axes.flat, data.items()):
        for (x, y), label, style, color in zip(pts, labels, ("o-", "s--"), ("C0", "C1")):
            if x:
                ax.plot(x, y, style, label=label, color=color, ms=5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: whole numbers
        ax.set(title=bounded(name, 60), xlabel="epoch", ylabel="test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    replace_atomic(lambda tmp: fig.savefig(tmp, format="png", dpi=110), path)
    plt.close(fig)


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
    try:  # the params TARGET ran with: which grid row it is
        params = yaml.safe_load(read_at(target_c, "params.yaml") or "{}")
    except yaml.YAMLError:
        params = None
    params = params if isinstance(params, dict) else {}
    match = study_match(target, is_exp, params)
    md = [f"## Results: {b} → {t}", ""] + params_section(pdiff, b, t) + [""]
    if match:
        md += [f"Study figures: `grids/{match[0]['name']}.yaml`, row `{match[1]['id']}` "
               f"({match[2]}).", ""]
    md += metrics_section(mdiff, b, t, study_figures(match, params))
    data = curves([base_c, target_c], mdiff)
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
