"""Report: the study's table for one grid, our numbers beside the study's, plus figures.

    python -m ablation.report grids/table3.yaml [--out reports]

Reads the grid's experiments from `dvc exp show --json` and writes reports/<grid>.md and PNG
figures beside it. Every row appears: finished ones with numbers (mean +/- std over seeds),
queued, running, failed, diverged and never-queued ones marked as such.
"""
import argparse
import math
import os
import statistics
import subprocess

from . import grid as G
from .cli import UserError, replace_atomic, run

DERIVED = {  # metric keys computed from others in the same metrics file
    "data_wait_pct": lambda m: 100.0 * m["data_wait_ms"] / m["train_time_ms"]
    if m.get("train_time_ms") else None,
}


def metric_file(ref, params):
    """'resnet/{dataset}/{model}.test_accuracy' -> ('metrics/resnet/mnist/resnet18.json', key)."""
    path, _, key = ref.rpartition(".")
    fill = {"dataset": params["data"]["datasets"][0], "model": params["train"]["models"][0],
            "kernel": params["svm"]["kernels"][0]}
    return f"metrics/{path.format(**fill)}.json", key


def metric_value(data, ref, params):
    path, key = metric_file(ref, params)
    m = ((data or {}).get("metrics") or {}).get(path, {}).get("data")
    if m is None:
        return None
    return DERIVED[key](m) if key in DERIVED else m.get(key)


def param_value(params, dotted):
    sec, _, key = dotted.partition(".")
    v = params[sec][key]
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def _num(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]
    return vals


def fmt(x, spec=None):
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if spec:
        return format(x, spec)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def cell(vals, spec=None):
    """One value, or mean +/- std (n) over seeds; text values are shown as they are."""
    nums = _num(vals)
    if not vals or all(v is None for v in vals):
        return "—", None
    if not nums:
        return ", ".join(sorted({str(v) for v in vals if v is not None})), None
    mean = statistics.fmean(nums)
    if len(vals) == 1:
        return fmt(mean, spec), mean
    sd = statistics.stdev(nums) if len(nums) > 1 else 0.0
    return f"{fmt(mean, spec)} ± {fmt(sd, spec)} (n={len(nums)})", mean


def row_runs(grid, exps):
    """{row id: [(name, seed, experiment or None)]}: the plain name and every -s<seed> found."""
    out = {}
    for r in grid["rows"]:
        runs = []
        base = G.exp_name(grid, r["id"])
        found = sorted(n for n in exps if n.startswith(base + "-s") and n[len(base) + 2:].isdigit())
        if base in exps:
            runs.append((base, None, exps[base]))
        for n in found:
            runs.append((n, int(n[len(base) + 2:]), exps[n]))
        if not runs:
            runs.append((base, None, None))
        out[r["id"]] = runs
    return out


def run_interval(exp, row, grid):
    """(start, end) in seconds of one finished run: end is its experiment commit's time, start
    end minus the timed work of the metrics files this row's columns read. An underestimate of
    the run's wall time, so runs that queued one after another never look overlapped."""
    from datetime import datetime
    end = datetime.fromisoformat(exp["timestamp"]).timestamp()
    files = {metric_file(c["metric"], row["params"])[0]
             for c in grid["columns"] + grid["extra"] if "metric" in c}
    work = 0.0
    for f in files:
        m = ((exp["data"] or {}).get("metrics") or {}).get(f, {}).get("data") or {}
        work += sum(m.get(k) or 0.0 for k in ("train_time_ms", "eval_time_ms",
                                                "predict_time_ms")) / 1000.0
    return end - work, end


def overlapping(grid, runs):
    """Names of finished runs whose timed work overlapped another run of this grid."""
    iv = {}
    for r in grid["rows"]:
        for name, _, e in runs[r["id"]]:
            if e and e["state"] == "success" and e.get("timestamp"):
                iv[name] = run_interval(e, r, grid)
    return {a for a in iv for b in iv if a != b and iv[a][0] < iv[b][1] and iv[b][0] < iv[a][1]}


def state_of(runs, overlapped=frozenset()):
    states = [e["state"] if e else "not queued" for _, _, e in runs]
    diverged = [n for n, _, e in runs if e and e["data"] and any(
        m.get("data", {}).get("diverged") for m in (e["data"].get("metrics") or {}).values())]
    ok = states.count("success")
    over = [n for n, _, _ in runs if n in overlapped]
    if ok == len(states):
        s = "ok" if not diverged else f"DIVERGED ({len(diverged)}/{len(states)})"
        if over:
            s += f", overlapped ({len(over)}/{len(states)})"
    else:
        others = sorted(set(states) - {"success"})
        s = ", ".join(f"{o.upper() if o == 'failed' else o} ({states.count(o)}/{len(states)})"
                      for o in others)
        if diverged:
            s += f", DIVERGED ({len(diverged)}/{len(states)})"
    return s


def build(grid, exps):
    """The Markdown report of `grid` from flattened experiments (grid.parse_exp_show)."""
    runs = row_runs(grid, exps)
    cols, extra = grid["columns"], grid["extra"]
    head = ["row", "state"]
    for c in cols:
        head += [c["label"]] if "param" in c else [f"{c['label']} (ours)", "study", "Δ"]
    head += [c["label"] for c in extra]
    lines = [f"# {grid['title']}", ""]
    if grid.get("note"):
        lines += [grid["note"].strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    points = []
    overlapped = overlapping(grid, runs)
    for r in grid["rows"]:
        rr = runs[r["id"]]
        done = [e for _, _, e in rr if e and e["state"] == "success"]
        cells = [r["id"], state_of(rr, overlapped)]
        for c in cols:
            if "param" in c:
                cells.append(fmt(param_value(r["params"], c["param"])))
                continue
            text, mean = cell([metric_value(e["data"], c["metric"], r["params"]) for e in done],
                              c.get("fmt"))
            study = r["study"].get(c["label"])
            delta = mean - study if mean is not None and isinstance(study, (int, float)) else None
            cells += [text, fmt(study, c.get("fmt")),
                      "—" if delta is None else f"{delta:+.{2 if abs(delta) < 100 else 0}f}"]
        for c in extra:
            if "param" in c:
                cells.append(fmt(param_value(r["params"], c["param"])))
            else:
                cells.append(cell([metric_value(e["data"], c["metric"], r["params"])
                                   for e in done], c.get("fmt"))[0])
        lines.append("| " + " | ".join(cells) + " |")
        points.append((r, done))
    failed = [n for rid in runs for n, _, e in runs[rid] if e and e["state"] == "failed"]
    lines += ["", "State: `ok` finished; `FAILED` see `dvc queue logs <experiment>`; `queued` / "
              "`running` not finished yet; `not queued` run `python -m ablation.grid queue`; "
              "`DIVERGED` a non-finite loss stopped training; `overlapped` the run shared the "
              "machine with another run of this grid (`dvc queue start -j 2` or more), so its "
              "timing columns are not comparable. Δ = ours − study."]
    if failed:
        lines += ["", "Failed experiments (the error line of `dvc queue logs <experiment>`):", ""]
        lines += [f"- `{n}`: {failure_reason(exps[n])}" for n in failed]
    return "\n".join(lines) + "\n", points


def failure_reason(exp):
    """The stage's own one-line error from the queue log, else DVC's last ERROR line."""
    try:
        with open(exp.get("log") or "", errors="replace") as f:
            text = f.read().splitlines()
    except OSError:
        return "log not available here"
    ours = [l.strip() for l in text if l.startswith("error: ")]
    dvc = [l.strip() for l in text if l.startswith("ERROR: ")]
    return (ours or dvc or ["no error line in the log"])[-1]


def accuracy_refs(grid):
    """The metric columns that are test accuracies, with the matching train-time / GFLOPs refs."""
    out = []
    for c in grid["columns"] + grid["extra"]:
        ref = c.get("metric", "")
        if ref.endswith(".test_accuracy"):
            stem = ref.rpartition(".")[0]
            out.append((c["label"], ref, stem + ".train_time_ms", stem + ".gflops"))
    return out


def git_show(rev, path):
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def figures(grid, points, outdir):
    """PNG figures beside the report; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    refs = accuracy_refs(grid)

    def scatter(xkey, xlabel, fname, logx):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        any_pt = False
        for label, acc, ttime, gfl in refs:
            xs, ys, ids = [], [], []
            for r, done in points:
                xref = {"time": ttime, "gflops": gfl}[xkey]
                x = _num([metric_value(e["data"], xref, r["params"]) for e in done])
                y = _num([metric_value(e["data"], acc, r["params"]) for e in done])
                if x and y:
                    xs.append(statistics.fmean(x) / (1000 if xkey == "time" else 1))
                    ys.append(statistics.fmean(y))
                    ids.append(r["id"])
            if xs:
                any_pt = True
                ax.scatter(xs, ys, label=label)
                for x, y, i in zip(xs, ys, ids):
                    ax.annotate(i, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if any_pt:
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy %")
            if logx:
                ax.set_xscale("log")
            ax.set_title(f"{grid['name']}: {xlabel} vs accuracy")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(outdir, fname), dpi=110)
            made.append(fname)
        plt.close(fig)

    scatter("time", "training time (s)", f"{grid['name']}_acc_vs_time.png", True)
    scatter("gflops", "forward GFLOPs per image", f"{grid['name']}_gflops_vs_acc.png", False)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = 0
    for label, acc, _, _ in refs:
        if not acc.startswith("resnet/"):
            continue
        for r, done in points:
            path = metric_file(acc, r["params"])[0][:-len(".json")]
            for e in done[:1]:  # first seed: curves of several seeds would overlap
                tsv = git_show(e["rev"], f"{path}/plots/metrics/test/accuracy.tsv")
                if not tsv:
                    continue
                rows = [l.split("\t") for l in tsv.strip().splitlines()[1:]]
                ax.plot([int(s) + 1 for s, _ in rows], [float(v) for _, v in rows],
                        marker="o", ms=3, label=f"{r['id']} {label}")
                n += 1
    if n:
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{grid['name']}: test accuracy per epoch")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fname = f"{grid['name']}_curves.png"
        fig.savefig(os.path.join(outdir, fname), dpi=110)
        made.append(fname)
    plt.close(fig)
    return made


def main(grid_path, outdir="reports", exps=None):
    g = G.load(grid_path)
    exps = G.experiments() if exps is None else exps
    md, points = build(g, exps)
    os.makedirs(outdir, exist_ok=True)
    pngs = figures(g, points, outdir)
    if pngs:
        md += "\n" + "\n".join(f"![{p}]({p})" for p in pngs) + "\n"
    path = os.path.join(outdir, f"{g['name']}.md")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(md)
    replace_atomic(write, path)
    print(f"wrote {path} ({len(g['rows'])} rows, {len(pngs)} figures)")
    return path


def _cli(argv):
    ap = argparse.ArgumentParser(prog="python -m ablation.report")
    ap.add_argument("grid")
    ap.add_argument("--out", default="reports")
    a = ap.parse_args(argv)
    main(a.grid, a.out)


if __name__ == "__main__":
    run(_cli)
