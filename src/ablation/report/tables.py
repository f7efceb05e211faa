"""The study's table for one grid as Markdown, built from what each run recorded.

Every cell comes from the run's own record: parameter columns from the params it ran with,
metric columns from its metrics files, chosen by those params. Runs whose params differ from
the row's plan (a `--set` variant, an edited params.yaml or grid) get their own line that says
what differs, and no Δ against the study. Every row appears: finished ones with numbers (mean
and 95 % t-interval over seeds, report.stats), queued, running, failed, diverged and
never-queued ones marked as such. A failed run shows no numbers (DVC shows its parent's).
"""
import pandas as pd

from ablation.record.dvc import failure_reason
from ablation.record.run import is_number
from ablation.report.format import markdown
from ablation.report.format import value as fmt
from ablation.report.runs import (
    PLAN,
    describe,
    finished,
    lines_of,
    overlapping,
    param_value,
    runs_frame,
)
from ablation.report.stats import summarize

LEGEND = (
    "State: `ok` finished; `FAILED` see `dvc queue logs <experiment>`; `queued` / `running` not "
    "finished yet; `not queued` run `python -m ablation.grid queue`; `needs a GPU` a row "
    "planned for a GPU that has no finished run (how to run it: below the table); `DIVERGED` "
    "a non-finite loss stopped training; `overlapped` the run shared the machine with another "
    "run of this grid (`dvc queue start -j 2` or more), so its timing columns are not "
    "comparable. Every value is what the run recorded; a line whose runs' params differ from "
    "the row's plan says how (`<variant>:` for a `--set` variant) and has no Δ. Δ = ours − "
    "study. A value over two or more seeds is their mean, its 95 % confidence interval "
    "[low – high] (Student's t-interval, mean ± t(0.975, n − 1) · sd / √n, from "
    "`scipy.stats.t`) and n, the seeds; ∈ / ∉ after the study's figure: it lies inside / "
    "outside that interval.")


def numbers(vals):
    """The numeric values of `vals` as floats (None, NaN and text left out)."""
    return [float(v) for v in vals if is_number(v)]


def cell(vals, spec=None):
    """(text, mean): one value, or mean [95 % t-interval] (n) over seeds; text values as they
    are."""
    s = pd.Series(list(vals), dtype=object).dropna()
    if s.empty:
        return "—", None
    nums = numbers(s)
    if not nums:
        return ", ".join(sorted(set(map(str, s)))), None
    ci = summarize(nums)
    if len(s) == 1:
        return fmt(ci.mean, spec), ci.mean
    if ci.n < 2:
        return f"{fmt(ci.mean, spec)} (n=1)", ci.mean
    return f"{fmt(ci.mean, spec)} [{fmt(ci.lo, spec)} – {fmt(ci.hi, spec)}] (n={ci.n})", ci.mean


def study_cell(study, vals, spec=None):
    """The study's figure, marked ∈ / ∉ where our values give an interval (2 or more seeds):
    inside it, or equal to our mean at the digits shown (the figure is rounded to them)."""
    ci = summarize(numbers(vals))
    if ci.lo is None or not is_number(study):
        return fmt(study, spec)
    inside = ci.holds(study) or fmt(ci.mean, spec) == fmt(study, spec)
    return fmt(study, spec) + (" ∈" if inside else " ∉")


def needs_device(row):
    """'a GPU' (or 'mps') where the row's planned train.device is one, else None."""
    dev = ((row.get("params") or {}).get("train") or {}).get("device")
    return {"cuda": "a GPU", "mps": "an Apple GPU (mps)"}.get(dev)


def missing_units(run):
    """(done, planned) train runs of a run taken in from GPU archives, where some of its
    dataset x model runs have not come back yet; None otherwise."""
    if not run or not run.imported:
        return None
    done = sum(u[0] == "train" for u in run.units().values())
    return (done, run.planned_units()) if done < run.planned_units() else None


def state_of(runs, names, overlapped=frozenset()):
    """A line's state: ok, or what its runs are (FAILED, queued ...), with DIVERGED,
    overlapped and partial where they apply. `names`: the line's finished runs."""
    states = [run.state if run else "not queued" for _, _, run in runs]
    partial = [m for _, _, run in runs if (m := missing_units(run))]
    diverged = [n for n, _, run in runs if n in names and any(
        v.get("diverged") for v in run.metrics.values() if isinstance(v, dict))]
    over = [n for n, _, _ in runs if n in overlapped]
    if states.count("success") == len(states):
        s = "ok" if not diverged else f"DIVERGED ({len(diverged)}/{len(states)})"
        if over:
            s += f", overlapped ({len(over)}/{len(states)})"
        if partial:
            s += ", partial (" + ", ".join(f"{d}/{p} runs" for d, p in partial) + ")"
        return s
    s = ", ".join(f"{o.upper() if o == 'failed' else o} ({states.count(o)}/{len(states)})"
                  for o in sorted(set(states) - {"success"}))
    return s + (f", DIVERGED ({len(diverged)}/{len(states)})" if diverged else "")


def table(grid, rows):
    """The title, the grid's note and the table of `rows` (their cells)."""
    cols, extra = grid["columns"], grid["extra"]
    head = ["row", "state"]
    for c in cols:
        head += [c["label"]] if "param" in c else [f"{c['label']} (ours)", "study", "Δ"]
    head += [c["label"] for c in extra]
    out = [f"# {grid['title']}", ""] + ([grid["note"].strip(), ""] if grid.get("note") else [])
    return out + markdown(head, rows)


def line_state(r, key, runs, g, overlapped):
    state = state_of(runs, set(g["name"]) if len(g) else set(), overlapped)
    if key == PLAN and needs_device(r) and not any(run and run.finished for _, _, run in runs):
        tried = any(run for _, _, run in runs)  # what was tried, in brackets
        state = f"needs {needs_device(r)}" + (f" ({state})" if tried else "")
    return state + (f"; {describe(key)}" if describe(key) else "")


def line_cells(grid, r, key, runs, g):
    """The cells after row and state: params as the line's first finished run recorded them
    (the plan's where none finished), values over its runs, the study and Δ."""
    done = [run for _, _, run in runs if run and run.finished]
    params = done[0].params if done and done[0].params is not None else r["params"]
    cells = []
    for i, c in enumerate(grid["columns"] + grid["extra"]):
        if "param" in c:
            cells.append(fmt(param_value(params, c["param"]))
                         if c["param"].partition(".")[0] in params else "—")
            continue
        text, mean = cell(g[f"value_{i}"], c.get("fmt"))
        cells.append(text)
        if i >= len(grid["columns"]):
            continue
        study = r["study"].get(c["label"])
        delta = mean - study if key == PLAN and mean is not None and \
            isinstance(study, (int, float)) else None
        cells += [study_cell(study, g[f"value_{i}"], c.get("fmt")) if key == PLAN
                  else fmt(study, c.get("fmt")),
                  "—" if delta is None else f"{delta:+.{2 if abs(delta) < 100 else 0}f}"]
    return cells


def build(grid, runs):
    """The Markdown report of `grid` from {name: Run}, and the frame of finished runs it was
    built from (report.runs)."""
    lines = lines_of(grid, runs)
    frame = runs_frame(grid, lines)
    groups = dict(iter(frame.groupby(["row", "line"], sort=False))) if len(frame) else {}
    overlapped = overlapping(grid, lines)
    rows = []
    for r in grid["rows"]:
        for key, rl in lines[r["id"]].items():
            g = groups.get((r["id"], key), frame.iloc[0:0])
            rows.append([r["id"], line_state(r, key, rl, g, overlapped)]
                        + line_cells(grid, r, key, rl, g))
    out = table(grid, rows)
    out += ["", LEGEND] + gpu_note(grid, lines) + failures(lines) + placement_note(lines)
    return "\n".join(out) + "\n", frame


def gpu_note(grid, lines):
    """How to run the rows that need a GPU and have no finished, queued or running run."""
    waiting = [r["id"] for r in grid["rows"] if needs_device(r) and not any(
        run and run.state in ("success", "queued", "running")
        for _, _, run in lines[r["id"]].get(PLAN, []))]
    if not waiting:
        return []
    path = grid.get("path") or f"grids/{grid['name']}.yaml"
    return ["", f"Rows that need a GPU ({', '.join(waiting)}) have not run; on a lent GPU "
            f"machine without DVC: `bash bench/gpu_study.sh` (after `bash bench/gpu_study.sh "
            f"--stage` here), then `python -m ablation.report --add gpu_study.tar.gz`; on a "
            f"machine or Ray cluster with one: `python -m ablation.grid run {path} --rows "
            f"{' '.join(waiting)}` (or `queue` the same rows and `dvc queue start`), then "
            f"`python -m ablation.report {path}`."]


def failures(lines):
    failed = [(n, run) for rl in lines.values() for runs in rl.values() for n, _, run in runs
              if run and run.state == "failed"]
    if not failed:
        return []
    return ["", "Failed experiments (the error line of `dvc queue logs <experiment>`):", ""] + \
        [f"- `{n}`: {failure_reason(run)}" for n, run in failed]


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
