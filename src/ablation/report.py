"""Report: the study's table for one grid, built from what each run recorded, plus figures
(figures.py).

    python -m ablation.report grids/table3.yaml [--out reports]

Reads the grid's experiments from `dvc exp show --json`, plus the runs an earlier report kept in
reports/<grid>.json, and writes reports/<grid>.md, PNG figures and that record beside it.
Every cell comes from the run's own record: parameter columns from the params it ran with,
metric columns from its metrics files, chosen by those params. Runs whose
params differ from the row's plan (a `--set` variant, an edited params.yaml or grid) get their
own line that says what differs, and no Δ against the study. Every row appears: finished ones
with numbers (mean +/- std over seeds), queued, running, failed, diverged and never-queued ones
marked as such. A failed run shows no numbers (DVC shows its parent's).
"""
import json
import math
import os
import subprocess

import pandas as pd

from .cli import Parser, UserError, bounded, run
from .grid import (
    NAME_RE,
    differences,
    error_line,
    exp_name,
    experiments,
    fmt_value,
    get,
    load,
    metric_file,
    parse_name,
    recorded_params,
    relevant_keys,
)
from .io import check_outputs, replace_atomic, write_json

DERIVED = {  # metric keys computed from others in the same metrics file (params.DERIVED_METRICS)
    "data_wait_pct": lambda m: 100.0 * m["data_wait_ms"] / m["train_time_ms"]
    if isinstance(m.get("data_wait_ms"), (int, float)) and m.get("train_time_ms") else None,
}
PLAN = (None, ())  # the line key of runs that ran the row as planned


def metric_value(exp, col):
    """The value a metric column reads from one finished run, by the params it ran with."""
    path = metric_file(col, recorded_params(exp) or {})
    m = (((exp or {}).get("data") or {}).get("metrics") or {}).get(path, {}).get("data")
    if m is None:
        return None
    key = col["metric"]
    return DERIVED[key](m) if key in DERIVED else m.get(key)


def param_value(params, dotted):
    v = get(params, dotted)
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(x, spec=None):
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if spec:
        return format(x, spec)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def cell(vals, spec=None):
    """(text, mean): one value, or mean +/- std (n) over seeds; text values as they are."""
    s = pd.Series(list(vals), dtype=object).dropna()
    if s.empty:
        return "—", None
    nums = s[s.map(is_number)].astype(float)
    if nums.empty:
        return ", ".join(sorted(set(map(str, s)))), None
    mean = float(nums.mean())
    if len(s) == 1:
        return fmt(mean, spec), mean
    sd = float(nums.std()) if len(nums) > 1 else 0.0  # sample std (n - 1), as statistics.stdev
    return f"{fmt(mean, spec)} ± {fmt(sd, spec)} (n={len(nums)})", mean


def lines_of(grid, exps):
    """{row id: {line key: [(name, seed, experiment or None)]}}.

    A line key is (variant, differences from the plan): PLAN for runs of the row as planned.
    Unfinished runs have no record, so they join their variant's line without differences."""
    keys = relevant_keys(grid)
    out = {}
    for r in grid["rows"]:
        lines = {PLAN: []}
        for name in sorted(exps):
            parsed = parse_name(grid, r["id"], name)
            if parsed is None:
                continue
            variant, seed = parsed
            e = exps[name]
            diff = differences(recorded_params(e), r["params"], keys) \
                if e["state"] == "success" else {}
            lines.setdefault((variant, tuple(sorted(diff.items()))), []).append((name, seed, e))
        if not lines[PLAN]:
            lines[PLAN].append((exp_name(grid, r["id"]), None, None))
        out[r["id"]] = lines
    return out


def runs_frame(grid, lines):
    """One record per finished run: row, line, name, seed, rev, params (as recorded) and, for
    metric column i, its value c<i>, the file it came from f<i>, and for figures t<i> train
    time, g<i> GFLOPs."""
    cols = grid["columns"] + grid["extra"]
    recs = []
    for r in grid["rows"]:
        for key, runs in lines[r["id"]].items():
            for name, seed, e in runs:
                if not e or e["state"] != "success":
                    continue
                rec = {"row": r["id"], "line": key, "name": name, "seed": seed, "rev": e["rev"],
                       "params": recorded_params(e), "curves": e["data"].get("curves")}
                for i, c in enumerate(cols):
                    if "metric" in c:
                        rec[f"f{i}"] = metric_file(c, recorded_params(e) or {})
                        rec[f"c{i}"] = metric_value(e, c)
                        rec[f"t{i}"] = metric_value(e, {**c, "metric": "train_time_ms"})
                        rec[f"g{i}"] = metric_value(e, {**c, "metric": "gflops"}) \
                            if c["stage"] == "train" else None
                recs.append(rec)
    return pd.DataFrame.from_records(recs, columns=["row", "line", "name", "seed", "rev",
                                                    "params", "curves"] + [
        f"{p}{i}" for i, c in enumerate(cols) if "metric" in c for p in "fctg"])


def describe(key):
    """What a line's runs changed against the plan, in words ('' for the plan itself)."""
    variant, diff = key
    text = ", ".join(f"{k.partition('.')[2]} {fmt_value(v)}" for k, v in diff)
    if variant:
        return f"{variant}: {text or 'as planned'}"
    return f"differs from plan: {text}" if text else ""


def run_interval(exp, grid):
    """(start, end) in seconds of one finished run: end is its experiment commit's time, start
    end minus the timed work of the metrics files this grid's columns read. An underestimate of
    the run's wall time, so runs that queued one after another never look overlapped."""
    from datetime import datetime
    end = datetime.fromisoformat(exp["timestamp"]).timestamp()
    params = recorded_params(exp) or {}
    files = {metric_file(c, params) for c in grid["columns"] + grid["extra"] if "metric" in c}
    work = 0.0
    for f in files - {None}:
        m = ((exp["data"] or {}).get("metrics") or {}).get(f, {}).get("data") or {}
        work += sum(m.get(k) or 0.0 for k in ("train_time_ms", "eval_time_ms",
                                                "predict_time_ms")) / 1000.0
    return end - work, end


def overlapping(grid, lines):
    """Names of finished runs whose timed work overlapped another run of this grid."""
    iv = {name: run_interval(e, grid) for rl in lines.values() for runs in rl.values()
          for name, _, e in runs if e and e["state"] == "success" and e.get("timestamp")}
    return {a for a in iv for b in iv if a != b and iv[a][0] < iv[b][1] and iv[b][0] < iv[a][1]}


def needs_device(row):
    """'a GPU' (or 'mps') where the row's planned train.device is one, else None."""
    dev = ((row.get("params") or {}).get("train") or {}).get("device")
    return {"cuda": "a GPU", "mps": "an Apple GPU (mps)"}.get(dev)


def missing_units(e):
    """(done, planned) train runs of an experiment taken in from GPU archives, where some of
    its dataset x model runs have not come back yet; None otherwise."""
    if not e or (e.get("source") or {}).get("kind") != "gpu-archive":
        return None
    p = recorded_params(e) or {}
    planned = len((p.get("data") or {}).get("datasets") or []) * \
        len((p.get("train") or {}).get("models") or [])
    done = sum(k.startswith("metrics/resnet/") for k in (e["data"].get("metrics") or {}))
    return (done, planned) if done < planned else None


def state_of(runs, frame, overlapped=frozenset()):
    states = [e["state"] if e else "not queued" for _, _, e in runs]
    partial = [m for _, _, e in runs if (m := missing_units(e))]
    names = set(frame["name"]) if len(frame) else set()
    diverged = [n for n, _, e in runs if n in names and e["data"] and any(
        (m.get("data") or {}).get("diverged") for m in (e["data"].get("metrics") or {}).values())]
    ok = states.count("success")
    over = [n for n, _, _ in runs if n in overlapped]
    if ok == len(states):
        s = "ok" if not diverged else f"DIVERGED ({len(diverged)}/{len(states)})"
        if over:
            s += f", overlapped ({len(over)}/{len(states)})"
        if partial:
            s += ", partial (" + ", ".join(f"{d}/{p} runs" for d, p in partial) + ")"
    else:
        others = sorted(set(states) - {"success"})
        s = ", ".join(f"{o.upper() if o == 'failed' else o} ({states.count(o)}/{len(states)})"
                      for o in others)
        if diverged:
            s += f", DIVERGED ({len(diverged)}/{len(states)})"
    return s


def build(grid, exps):
    """The Markdown report of `grid` from flattened experiments (grid.parse_exp_show), and the
    frame of finished runs it was built from."""
    lines = lines_of(grid, exps)
    frame = runs_frame(grid, lines)
    groups = dict(iter(frame.groupby(["row", "line"], sort=False))) if len(frame) else {}
    cols, extra = grid["columns"], grid["extra"]
    head = ["row", "state"]
    for c in cols:
        head += [c["label"]] if "param" in c else [f"{c['label']} (ours)", "study", "Δ"]
    head += [c["label"] for c in extra]
    out = [f"# {grid['title']}", ""]
    if grid.get("note"):
        out += [grid["note"].strip(), ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    overlapped = overlapping(grid, lines)
    for r in grid["rows"]:
        for key, runs in lines[r["id"]].items():
            g = groups.get((r["id"], key), frame.iloc[0:0])
            done = [e for n, _, e in runs if e and e["state"] == "success"]
            params = recorded_params(done[0]) if done else None
            params = r["params"] if params is None else params
            state = state_of(runs, g, overlapped)
            if not done and needs_device(r) and key == PLAN:  # what was tried, in brackets
                tried = any(e for _, _, e in runs)
                state = f"needs {needs_device(r)}" + (f" ({state})" if tried else "")
            if describe(key):
                state += f"; {describe(key)}"
            cells = [r["id"], state]
            for i, c in enumerate(cols + extra):
                if "param" in c:
                    cells.append(fmt(param_value(params, c["param"]))
                                 if c["param"].partition(".")[0] in params else "—")
                    continue
                text, mean = cell(g[f"c{i}"], c.get("fmt"))
                cells.append(text)
                if i >= len(cols):
                    continue
                study = r["study"].get(c["label"])
                delta = mean - study if key == PLAN and mean is not None and \
                    isinstance(study, (int, float)) else None
                cells += [fmt(study, c.get("fmt")),
                          "—" if delta is None else f"{delta:+.{2 if abs(delta) < 100 else 0}f}"]
            out.append("| " + " | ".join(cells) + " |")
    failed = [n for rl in lines.values() for runs in rl.values() for n, _, e in runs
              if e and e["state"] == "failed"]
    out += ["", "State: `ok` finished; `FAILED` see `dvc queue logs <experiment>`; `queued` / "
            "`running` not finished yet; `not queued` run `python -m ablation.grid queue`; "
            "`needs a GPU` a row planned for a GPU that has no finished run (how to run it: "
            "below the table); "
            "`DIVERGED` a non-finite loss stopped training; `overlapped` the run shared the "
            "machine with another run of this grid (`dvc queue start -j 2` or more), so its "
            "timing columns are not comparable. Every value is what the run recorded; a line "
            "whose runs' params differ from the row's plan says how (`<variant>:` for a "
            "`--set` variant) and has no Δ. Δ = ours − study."]
    waiting = [r["id"] for r in grid["rows"] if needs_device(r) and not any(  # as planned
        e and e["state"] in ("success", "queued", "running")
        for _, _, e in lines[r["id"]].get(PLAN, []))]
    if waiting:
        path = grid.get("path") or f"grids/{grid['name']}.yaml"
        out += ["", f"Rows that need a GPU ({', '.join(waiting)}) have not run; on a lent "
                f"GPU machine without DVC: `bash bench/gpu_study.sh` (after `bash "
                f"bench/gpu_study.sh --stage` here), then `python -m ablation.report --add "
                f"gpu_study.tar.gz`; on a machine or Ray cluster with one: `python -m "
                f"ablation.grid run {path} --rows {' '.join(waiting)}` (or `queue` the same "
                f"rows and `dvc queue start`), then `python -m ablation.report {path}`."]
    if failed:
        out += ["", "Failed experiments (the error line of `dvc queue logs <experiment>`):", ""]
        out += [f"- `{n}`: {failure_reason(exps[n])}" for n in failed]
    where = placement(lines)
    if where:
        out += ["", "Where the runs ran (`grid run` on Ray: host, Ray node, the GPUs the run "
                "was given; the GPU study's archive: the GPU and how runs shared it, taken in "
                "with `report --add`):", ""] + where
    return "\n".join(out) + "\n", frame


def placement(lines):
    """One line per finished run that a scheduler placed (it recorded a Ray node id)."""
    out = []
    for rl in lines.values():
        for runs in rl.values():
            for name, _, e in runs:
                if not e or e["state"] != "success":
                    continue
                src = e.get("source") or {}
                if src.get("kind") == "gpu-archive":
                    out.append(f"- `{name}`: {src.get('gpu') or src.get('host')} (driver "
                               f"{src.get('driver')}, torch {src.get('torch')}, CUDA "
                               f"{src.get('cuda')}), packing {src.get('packing')}, code "
                               f"{str(src.get('commit'))[:10]}"
                               f"{' (dirty)' if src.get('dirty') else ''}; from GPU archive "
                               f"{str(src.get('archive_sha256'))[:12]}{later(e, src)}, not run "
                               f"by DVC")
                    continue
                for m in ((e["data"] or {}).get("metrics") or {}).values():
                    m = m.get("data") or {}
                    if m.get("ray_node_id"):
                        out.append(f"- `{name}`: {m.get('host')}, node "
                                   f"{str(m['ray_node_id'])[:8]}, GPUs "
                                   f"{m.get('cuda_visible_devices') or 'none'}")
                        break
    return sorted(out)


def later(e, src):
    """', N runs from archive X' for the runs of `e` a later archive brought."""
    other = [v for v in ((e["data"] or {}).get("sources") or {}).values()
             if v != src.get("archive_sha256")]
    return "".join(f", {other.count(v)} run(s) from archive {str(v)[:12]}"
                   for v in sorted(set(other), key=str))


def failure_reason(exp):
    """The stage's own one-line error from the queue log, else DVC's last ERROR line."""
    try:
        with open(exp.get("log") or "", errors="replace") as f:
            return error_line(f.read(1 << 22))  # a bounded read: logs can be huge
    except OSError:
        return "log not available here"


def git_show(rev, path):
    """A file's text at a git revision, or None."""
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def curve_path(metrics_path):
    """dvclive's per-epoch test accuracy beside a ResNet run's metrics file."""
    return f"{metrics_path[:-len('.json')]}/plots/metrics/test/accuracy.tsv"


def read_curve(rev, metrics_path):
    """{epoch (from 1): test accuracy %} of the run whose metrics file is `metrics_path`, at
    git revision `rev` (None: the workspace); {} where the file is missing or is not dvclive's
    two columns (step, value)."""
    path = curve_path(metrics_path)
    if rev is None:
        text = open(path, errors="replace").read(1 << 20) if os.path.isfile(path) else None
    else:
        text = git_show(rev, path)
    out = {}
    for line in (text or "").strip().splitlines()[1:]:
        try:
            step, value = line.split("\t")
            out[int(step) + 1] = float(value)
        except ValueError:
            return {}
    return out


MAX_RECORDS_BYTES = 32 << 20  # a record is about 10 KB a run


def load_records(path):
    """The finished runs a committed report was built from, {name: experiment} as
    grid.experiments() gives them; {} where there is no such file. Anything else in the file is
    one UserError naming it."""
    if not os.path.exists(path):
        return {}

    def bad(what):
        raise UserError(f"{bounded(path)}: not a report's run record: {what} (delete it, or "
                        f"restore it from git)")
    try:
        if os.path.getsize(path) > MAX_RECORDS_BYTES:
            bad(f"more than {MAX_RECORDS_BYTES} bytes")
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        bad(type(e).__name__)
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, dict):
        bad("expected {\"runs\": {name: run}}")
    for name, e in runs.items():
        data = e.get("data") if isinstance(e, dict) else None
        if not (isinstance(data, dict) and isinstance(data.get("params"), dict)
                and isinstance(data.get("metrics"), dict) and e.get("state") == "success"
                and isinstance(e.get("timestamp"), str)):
            bad(f"run {bounded(repr(name), 60)} lacks state, timestamp, params or metrics")
    return runs


def write_records(path, grid, exps):
    """Keep, beside the report, what it was built from: each finished run of the grid with its
    recorded params and metrics, so the report can be rebuilt (and extended) on any clone even
    after the experiments are gone."""
    runs = {name: {"state": "success", "rev": e.get("rev"), "timestamp": e["timestamp"],
                   **({"source": e["source"]} if e.get("source") else {}),
                   "data": {"params": e["data"].get("params") or {},
                            "metrics": e["data"].get("metrics") or {},
                            **({"curves": e["data"]["curves"]} if e["data"].get("curves")
                               else {})}}
            for name, e in sorted(exps.items())
            if e and e.get("state") == "success" and e.get("data")
            and any(parse_name(grid, r["id"], name) is not None for r in grid["rows"])}
    write_json({"grid": grid["name"], "runs": runs}, path)
    return runs


def variants_of(grid, name):
    """The variants (None: as planned) that experiment `name` is a run of, over the grid's rows;
    empty if it is no run of the grid."""
    return {p[0] for r in grid["rows"] if (p := parse_name(grid, r["id"], name)) is not None}


def planned_only(grid, exps, keep=()):
    """The experiments that are runs of a row as planned (no `--set` variant, such as the smoke
    runs), and those of the variants named in `keep` (controlled runs worth a line)."""
    allowed = {None, *keep}
    return {name: e for name, e in exps.items() if variants_of(grid, name) & allowed}


def main(grid_path, outdir="reports", exps=None, plan_only=False, keep=(), imported=None):
    """Write the grid's report from its record and live experiments; `imported`: the record
    to use instead of the file's (report --add has merged an archive into it)."""
    for v in keep:
        if not NAME_RE.match(v):
            raise UserError(f"--with-variants {bounded(repr(v), 60)}: not a variant name "
                            "(letters, digits, _ and ., as given to `grid queue --tag`)")
    g = load(grid_path)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UserError(f"--out {bounded(outdir)}: not a directory")
    records = os.path.join(outdir, f"{g['name']}.json")
    check_outputs(os.path.join(outdir, f"{g['name']}.md"), records)
    recorded = load_records(records) if imported is None else imported
    live = experiments() if exps is None else exps
    exps = {**recorded, **{n: e for n, e in live.items()  # live runs win, but an unfinished
                           if n not in recorded or e.get("state") == "success"  # DVC run does
                           or (recorded[n].get("source") or {}).get("kind") != "gpu-archive"}}
    if keep:
        known = set().union(*(variants_of(g, name) for name in exps)) - {None}
        missing = [v for v in keep if v not in known]
        if missing:
            raise UserError(f"--with-variants {bounded(repr(missing[0]), 60)}: no run of the "
                            f"grid has that variant (variants with runs: "
                            f"{bounded(', '.join(sorted(known)) or 'none', 200)})")
    if plan_only or keep:
        exps = planned_only(g, exps, keep)
    md, frame = build(g, exps)
    os.makedirs(outdir, exist_ok=True)
    from .figures import figures  # matplotlib: only where figures are drawn
    pngs = figures(g, frame, outdir)
    if pngs:
        md += "\n" + "\n".join(f"![{p}]({p})" for p in pngs) + "\n"
    path = os.path.join(outdir, f"{g['name']}.md")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(md)
    replace_atomic(write, path)
    kept = write_records(records, g, exps)
    print(f"wrote {path} ({len(g['rows'])} rows, {len(pngs)} figures) and {records} "
          f"({len(kept)} finished runs, {len(recorded)} of them read from it)")
    return path


def _cli(argv):
    ap = Parser(prog="python -m ablation.report",
                                 description="Write reports/<grid>.md and figures from the "
                                             "grid's DVC experiments.")
    ap.add_argument("grid", nargs="?", help="a grid file, e.g. grids/table3.yaml")
    ap.add_argument("--add", metavar="ARCHIVE",
                    help="take the GPU study's archive (bench/gpu_study.sh) into the record of "
                         "its grids and rebuild their reports")
    ap.add_argument("--out", default="reports", help="directory for the report and figures")
    ap.add_argument("--plan-only", action="store_true",
                    help="leave out --set variants (smoke runs): the rows as planned only")
    ap.add_argument("--with-variants", nargs="+", default=[], metavar="VARIANT",
                    help="the rows as planned plus these --set variants, each on its own line "
                         "(e.g. a controlled run: `grid queue ... --set train.momentum=0.0 "
                         "--tag nomomentum`)")
    ap.add_argument("--allow-dry-run", action="store_true",
                    help="with --add: take a dry run's archive (toy CPU runs; a scratch clone)")
    a = ap.parse_args(argv)
    if a.add:
        return add(a.add, a.out, a.grid, a.allow_dry_run)
    if not a.grid:
        raise UserError("python -m ablation.report: give a grid file, or --add ARCHIVE")
    main(a.grid, a.out, plan_only=a.plan_only, keep=a.with_variants)


def add(archive, outdir="reports", grid_path=None, allow_dry_run=False):
    """Merge the archive's runs into each grid's record and rebuild that grid's report; with
    `grid_path`, only that grid's runs. Everything is read and checked (the archive, the
    records, DVC's experiments) before anything is written."""
    from .gpu_import import merge, read_runs
    incoming = read_runs(archive, allow_dry_run=allow_dry_run)
    if grid_path:
        name = load(grid_path)["name"]
        incoming = {k: v for k, v in incoming.items() if k == name}
    plans = []
    for name, (g, runs) in sorted(incoming.items()):
        path = g["path"] if not grid_path else grid_path
        merged, added, skipped = merge(load_records(os.path.join(outdir, f"{name}.json")), runs)
        for why in skipped:
            print(f"{path}: kept what the record holds for {why}")
        plans.append((path, merged, added))
    live = experiments() if any(added for _, _, added in plans) else {}
    for path, merged, added in plans:
        if not added:
            print(f"{path}: nothing new in {bounded(archive, 100)} (its runs are in the record)")
            continue
        print(f"{path}: adding {', '.join(added)}")
        main(path, outdir, exps=live, imported=merged)


if __name__ == "__main__":
    run(_cli)
