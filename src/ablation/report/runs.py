"""A grid's runs sorted into the report's lines, and the frame of finished runs that the table
and the figures read.

A line of a row is its runs that share a variant and the same differences from the row's plan:
PLAN for the runs of the row as planned. The frame has one record per finished run: row, line,
name, seed, the Run itself, its params, and for each metric column i of the grid
(columns + extra) `value_i` (what the column reads), `file_i` (the metrics file it read),
`train_ms_i` and `gflops_i` (the figures' x axes).
"""
from datetime import datetime, timezone

import pandas as pd

from ablation.grid.schema import differences, metric_file, relevant_keys, runs_of_row
from ablation.record.run import TIMINGS, RunId, busy, is_number
from ablation.training.overrides import fmt_value, get

PLAN = (None, ())  # the line key of runs that ran the row as planned
PER_COLUMN = ("value", "file", "train_ms", "gflops")  # frame columns per metric column: <x>_<i>


def param_value(params, dotted):
    """A param as a table shows it: a list of one (datasets: [mnist]) as its one value."""
    v = get(params, dotted)
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def metric_value(run, col, key=None):
    """The value a metric column (or `key` of the same file) reads from one finished run,
    chosen by the params it ran with."""
    return run.metric(metric_file(col, run.params or {}), key or col["metric"])


def lines_of(grid, runs):
    """{row id: {line key: [(name, seed, Run or None)]}} from {name: Run}. A line key is
    (variant, differences from the plan). Unfinished runs have no params to compare, so they
    join their variant's line without differences; a row with no run has the plan's name."""
    keys = relevant_keys(grid)
    out = {}
    for r in grid["rows"]:
        lines = {PLAN: []}
        for name, run in sorted(runs_of_row(grid, r["id"], runs).items()):
            rid = RunId.parse(name)
            diff = differences(run.params, r["params"], keys) if run.finished else {}
            lines.setdefault((rid.variant, tuple(sorted(diff.items()))), []).append(
                (name, rid.seed, run))
        if not lines[PLAN]:
            lines[PLAN].append((RunId(grid["name"], r["id"]).name, None, None))
        out[r["id"]] = lines
    return out


def finished(lines):
    """(row id, line key, name, seed, Run) of every finished run in `lines`."""
    return [(rid, key, name, seed, run) for rid, rl in lines.items()
            for key, runs in rl.items() for name, seed, run in runs if run and run.finished]


def runs_frame(grid, lines):
    """The frame of finished runs (module docstring)."""
    cols = grid["columns"] + grid["extra"]
    metric_cols = [i for i, c in enumerate(cols) if "metric" in c]
    recs, overlapped = [], overlapping(grid, lines)
    for rid, key, name, seed, run in finished(lines):
        rec = {"row": rid, "line": key, "name": name, "seed": seed, "run": run,
               "params": run.params}
        for i in metric_cols:
            c = cols[i]
            rec[f"file_{i}"] = path = metric_file(c, run.params or {})
            # its timings say nothing: the machine was busy, or shared with this grid's runs
            loaded = name in overlapped or (busy(run.values(path)) if path else False)
            rec[f"value_{i}"] = None if loaded and c["metric"] in TIMINGS else \
                metric_value(run, c)
            rec[f"train_ms_{i}"] = None if loaded else metric_value(run, c, "train_time_ms")
            rec[f"gflops_{i}"] = metric_value(run, c, "gflops") if c["stage"] == "train" \
                else None
        recs.append(rec)
    return pd.DataFrame.from_records(recs, columns=["row", "line", "name", "seed", "run",
                                                    "params"] + [
        f"{p}_{i}" for i in metric_cols for p in PER_COLUMN])


def planned(frame):
    """The frame's runs of their row as planned."""
    return frame[frame["line"].map(lambda k: k == PLAN)] if len(frame) else frame


def describe(key):
    """What a line's runs changed against the plan, in words ('' for the plan itself)."""
    variant, diff = key
    text = ", ".join(f"{k.partition('.')[2]} {fmt_value(v)}" for k, v in diff)
    if variant:
        return f"{variant}: {text or 'as planned'}"
    return f"differs from plan: {text}" if text else ""


def run_interval(run, grid):
    """(start, end) in seconds of one finished run's timed work: end is when it ended as its
    record says (`timed_end`, UTC: kept by a restore from DVC's run cache), start is end minus
    the timed work of the metrics files this grid's columns read (an underestimate of its wall
    time, so runs queued one after another never look overlapped). None where the record has
    no `timed_end` (older records): the experiment's commit time is no stand-in, since a run
    DVC restored from its run cache is committed long after it trained (baseline's Fashion-MNIST
    seed 0 looked as if it trained beside MNIST seed 1, docs/measurements.md 2026-12-07)."""
    files = grid_files(run, grid)
    ends = [e for f in files if isinstance(e := run.values(f).get("timed_end"), str)]
    try:
        end = max(utc_seconds(e) for e in ends) if ends else None
    except ValueError:  # not a time: the record is hostile or broken
        end = None
    if end is None:
        return None
    work = sum((run.values(f).get(k) or 0.0) for f in files
               for k in ("train_time_ms", "eval_time_ms", "predict_time_ms")) / 1000.0
    return end - work, end


def grid_files(run, grid):
    """The metrics files of one run that this grid's metric columns read."""
    return {metric_file(c, run.params or {}) for c in grid["columns"] + grid["extra"]
            if "metric" in c} - {None}


def utc_seconds(text):
    """Seconds since the epoch of an ISO time; one without a zone (DVC's) is UTC."""
    t = datetime.fromisoformat(text)
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def loaded_runs(grid, lines):
    """Names of finished runs whose record says other processes loaded the machine past
    record.run.LOAD_LIMIT while they were timed (their timings are left out)."""
    return {name for _, _, name, _, run in finished(lines)
            if any(busy(run.values(f)) for f in grid_files(run, grid))}


def unplaced(grid, lines):
    """Names of finished runs whose record holds neither their load (`other_load_cores`) nor
    when their timed work ended (`timed_end`): recorded before runs measured them, so neither
    a `loaded` nor an `overlapped` mark can be given or ruled out."""
    out = set()
    for _, _, name, _, run in finished(lines):
        files = grid_files(run, grid)
        if files and not any(is_number(run.values(f).get("other_load_cores")) or
                             isinstance(run.values(f).get("timed_end"), str) for f in files):
            out.add(name)
    return out


def overlapping(grid, lines):
    """Names of finished runs whose timed work overlapped another run of this grid (runs whose
    record places it: run_interval)."""
    iv = {name: w for _, _, name, _, run in finished(lines)
          if (w := run_interval(run, grid)) is not None}
    return {a for a in iv for b in iv if a != b and iv[a][0] < iv[b][1] and iv[b][0] < iv[a][1]}


def placement_note(lines):
    where = placement(lines)
    if not where:
        return []
    return ["", "Where the runs ran (`grid run` on Ray: host, Ray node, the GPUs the run was "
            "given; the GPU study's archive: the GPU and how runs shared it, taken in with "
            "`report --add`):", ""] + where


def placement(lines):
    """One line per finished run that a scheduler placed (it recorded a Ray node id) or that
    came from a GPU archive."""
    out = []
    for _, _, name, _, run in finished(lines):
        src = run.source
        if run.imported:
            out.append(f"- `{name}`: {src.get('gpu') or src.get('host')} (driver "
                       f"{src.get('driver')}, torch {src.get('torch')}, CUDA "
                       f"{src.get('cuda')}), packing {src.get('packing')}, code "
                       f"{str(src.get('commit'))[:10]}{' (dirty)' if src.get('dirty') else ''}"
                       f"; from GPU archive {str(src.get('archive_sha256'))[:12]}"
                       f"{later(run)}, not run by DVC")
            continue
        for v in run.metrics.values():
            if isinstance(v, dict) and v.get("ray_node_id"):
                out.append(f"- `{name}`: {v.get('host')}, node {str(v['ray_node_id'])[:8]}, "
                           f"GPUs {v.get('cuda_visible_devices') or 'none'}")
                break
    return sorted(out)


def later(run):
    """', N runs from archive X' for the stage runs of `run` a later archive brought."""
    other = [v for v in run.sources.values() if v != run.source.get("archive_sha256")]
    return "".join(f", {other.count(v)} run(s) from archive {str(v)[:12]}"
                   for v in sorted(set(other), key=str))
