"""A grid's report as Markdown, built from what each run recorded: the lines of its table
(tabulate; report.headline opens the report with them), the full table and what goes under it,
the Method section.

Every cell comes from the run's own record: parameter columns from the params it ran with,
metric columns from its metrics files, chosen by those params. Runs whose params differ from
the row's plan (a `--set` variant, an edited params.yaml or grid) get their own line that says
what differs, and no Δ against the study. Every row appears: finished ones with numbers (mean
and 95 % t-interval over seeds, report.stats), queued, running, failed, diverged and
never-queued ones marked as such. A failed run shows no numbers (DVC shows its parent's).

The parts, in the order report.command puts them (report.headline's headline and notes
first, report.claims' Conclusions after them):
    full(t)                every line and column, folded; a metric column that gives one value
                           in every run of a line (GFLOPs, a model's size) listed under it
                           instead; then how to run the rows that need a GPU, and the failures
    method(paragraphs)     ## Method: LEGEND and report.claims' legends
A value over seeds that ran on more than one machine setting (the recorded device name, ISA,
threads and small-map kernel paths) has a † after it, named in a footnote under its table.
"""
from typing import NamedTuple

import pandas as pd

from ablation.record.dvc import failure_reason
from ablation.record.run import is_number
from ablation.report.changes import describe as describe_machine
from ablation.report.changes import differ, paths_apart, setting
from ablation.report.format import markdown, signed
from ablation.report.format import value as fmt
from ablation.report.runs import (
    PLAN,
    describe,
    lines_of,
    loaded_runs,
    overlapping,
    param_value,
    placement_note,
    runs_frame,
    unplaced,
)
from ablation.report.stats import predicts, summarize

DAGGER = "†"  # after a value whose seeds ran on more than one machine setting
LEGEND = (
    "The table at the top has a line for each line of the full table: its row (with its state "
    "where that is not `ok`), the params that differ between the lines, and the grid's first "
    "column with the study's figures: ours, the study's, and the verdict of ours against it "
    "(Conclusions, \"Ours against the study's figures\"). State: `ok` finished; `FAILED` see "
    "`dvc queue logs <experiment>`; `queued` / `running` not finished yet; `not queued` run "
    "`python -m ablation.grid queue`; `needs a GPU` a row planned for a GPU that has no "
    "finished run (how to run it: under the full table); `DIVERGED` a non-finite loss stopped "
    "training; `overlapped` the run's timed work (its record's `timed_end` less its timed "
    "milliseconds) overlapped another run of this grid (`dvc queue start -j 2` or more); "
    "`loaded` other processes kept more than 0.25 cores busy over its timed epochs (its "
    "record's `other_load_cores`). Either way its timings are left out of the cells and "
    "tests, its accuracy kept; a run recorded before runs measured these can carry neither "
    "mark (the full table names such runs). Every "
    "value is what the run recorded; a line whose runs' params differ from the row's plan says how "
    "(`<variant>:` for a `--set` variant) and has no Δ. Δ = ours − study, in the column's "
    "format. A value over two or more seeds is their mean, its 95 % confidence interval "
    "[low – high] (Student's t-interval, mean ± t(0.975, n − 1) · sd / √n, from "
    "`scipy.stats.t`) and n, the seeds; ∈ / ∉ after the study's figure (full table): it lies "
    "inside / outside the 95 % prediction interval of one more run of ours, mean ± t(0.975, "
    "n − 1) · sd · √(1 + 1/n) (the study's figure is one run; before Holm); † after n: the "
    "seeds ran on more than one machine setting (device name, instruction set, threads and "
    "the small-map kernel paths as the runs recorded them; one left unrecorded is no "
    "difference). A metric column that gives "
    "one value in every run of each line (a model's size, its GFLOPs) is listed under the full "
    "table instead of in it.")


class Cell(NamedTuple):
    """One metric column of one line: ours (with † where its seeds ran on more than one
    machine setting), the study's figure as the full table shows it, Δ, and those settings."""
    ours: str
    study: str
    delta: str
    machines: tuple = ()


class Line(NamedTuple):
    """One line of the table: the runs of a row as planned, or of one variant of it."""
    row: dict            # the grid's row
    key: tuple           # report.runs' line key: PLAN, or (variant, differences)
    state: str           # ok, needs a GPU, FAILED (1/3) ...
    params: dict         # {label: text} of the param columns, as the line's runs ran
    cells: dict          # {label: Cell} of the metric columns (columns and extra)
    done: pd.DataFrame   # its finished runs: their records of the frame


class Table(NamedTuple):
    """A grid's table, built once from its runs; the report's parts read it."""
    grid: dict
    lines: list          # Line, in the grid's row order
    frame: pd.DataFrame  # report.runs' frame of the finished runs
    by_row: dict         # report.runs.lines_of: {row id: {line key: [(name, seed, Run)]}}


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
    """The study's figure, marked ∈ / ∉ where our values give a prediction interval (2 or more
    seeds): inside the interval of one more run of ours, or equal to our mean at the digits
    shown (the figure is rounded to them)."""
    ci = summarize(numbers(vals))
    if ci.lo is None or not is_number(study):
        return fmt(study, spec)
    inside = predicts(numbers(vals), study) or fmt(ci.mean, spec) == fmt(study, spec)
    return fmt(study, spec) + (" ∈" if inside else " ∉")


def machines(done, i):
    """The machine settings (device name, ISA, threads and kernel paths: report.changes.setting)
    that a line's runs recorded for metric column i, where two of them differ; () where none
    do."""
    seen = {setting(run.values(path)) for run, path in zip(done["run"], done[f"file_{i}"])}
    seen.discard(None)
    if not any(differ(a, b) for a in seen for b in seen):
        return ()

    def unknown(m):
        return sum(x is None for x in m)
    # a setting that another names more fully (an ISA one record left out) is that one
    return tuple(sorted((m for m in seen if not any(
        o != m and not differ(m, o) and unknown(o) < unknown(m) for o in seen)), key=str))


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


def state_of(runs, names, marked=None):
    """A line's state: ok, or what its runs are (FAILED, queued ...), with DIVERGED, partial
    and each mark of `marked` ({'overlapped': names, 'loaded': names}) where they apply.
    `names`: the line's finished runs."""
    states = [run.state if run else "not queued" for _, _, run in runs]
    partial = [m for _, _, run in runs if (m := missing_units(run))]
    diverged = [n for n, _, run in runs if n in names and any(
        v.get("diverged") for v in run.metrics.values() if isinstance(v, dict))]
    if states.count("success") == len(states):
        s = "ok" if not diverged else f"DIVERGED ({len(diverged)}/{len(states)})"
        for word, which in (marked or {}).items():
            hit = sum(n in which for n, _, _ in runs)
            s += f", {word} ({hit}/{len(states)})" if hit else ""
        if partial:
            s += ", partial (" + ", ".join(f"{d}/{p} runs" for d, p in partial) + ")"
        return s
    s = ", ".join(f"{o.upper() if o == 'failed' else o} ({states.count(o)}/{len(states)})"
                  for o in sorted(set(states) - {"success"}))
    return s + (f", DIVERGED ({len(diverged)}/{len(states)})" if diverged else "")


def line_state(r, key, runs, done, marked):
    state = state_of(runs, set(done["name"]), marked)
    if key == PLAN and needs_device(r) and not any(run and run.finished for _, _, run in runs):
        tried = any(run for _, _, run in runs)  # what was tried, in brackets
        state = f"needs {needs_device(r)}" + (f" ({state})" if tried else "")
    return state


def line_params(grid, r, runs):
    """{label: text} of the param columns as the line's first finished run recorded them (the
    plan's where none finished)."""
    done = [run for _, _, run in runs if run and run.finished]
    params = done[0].params if done and done[0].params is not None else r["params"]
    return {c["label"]: fmt(param_value(params, c["param"]))
            if c["param"].partition(".")[0] in params else "—"
            for c in grid["columns"] + grid["extra"] if "param" in c}


def line_cells(grid, r, key, done):
    """{label: Cell} of the metric columns: values over the line's runs, the study and Δ (the
    plan's line alone is compared with the study)."""
    cells = {}
    for i, c in enumerate(grid["columns"] + grid["extra"]):
        if "metric" not in c:
            continue
        spec, vals, study = c.get("fmt"), done[f"value_{i}"], r["study"].get(c["label"])
        text, mean = cell(vals, spec)
        ran_on = machines(done, i) if len(numbers(vals)) > 1 else ()
        delta = mean - study if key == PLAN and mean is not None and is_number(study) else None
        cells[c["label"]] = Cell(text + (DAGGER if ran_on else ""),
                                 study_cell(study, vals, spec) if key == PLAN
                                 else fmt(study, spec), signed(delta, spec), ran_on)
    return cells


def tabulate(grid, runs):
    """The Table of `grid` from {name: Run}."""
    by_row = lines_of(grid, runs)
    frame = runs_frame(grid, by_row)
    groups = dict(iter(frame.groupby(["row", "line"], sort=False))) if len(frame) else {}
    marked = {"overlapped": overlapping(grid, by_row), "loaded": loaded_runs(grid, by_row)}
    lines = []
    for r in grid["rows"]:
        for key, runs_of_line in by_row[r["id"]].items():
            done = groups.get((r["id"], key), frame.iloc[0:0])
            lines.append(Line(r, key, line_state(r, key, runs_of_line, done, marked),
                              line_params(grid, r, runs_of_line),
                              line_cells(grid, r, key, done), done))
    return Table(grid, lines, frame, by_row)


def build(grid, runs):
    """The full table's Markdown (full()) of `grid` from {name: Run}, and the frame of
    finished runs it was built from (report.runs)."""
    t = tabulate(grid, runs)
    return full(t), t.frame


def differs(line):
    """[what the line's runs changed against the plan], or [] for the plan's line."""
    return [describe(line.key)] if describe(line.key) else []


def label_of(line, state=False):
    """The row id, with what sets the line apart in brackets: its state where not ok (with
    `state`), its variant or differences from the plan."""
    what = ([line.state] if state and line.state != "ok" else []) + differs(line)
    return line.row["id"] + (f" ({'; '.join(what)})" if what else "")


def dagger_note(lines, labels):
    """The footnote of the † in columns `labels`: the lines and the machine settings their
    seeds ran on."""
    by_setting = {}
    for line in lines:
        for ms in {line.cells[lb].machines for lb in labels if line.cells[lb].machines}:
            by_setting.setdefault(ms, []).append(label_of(line))
    if not by_setting:
        return []
    named = "; ".join(", ".join(names) + ": " + " / ".join(map(describe_machine, ms))
                      + ((" (on the matmul path in some runs only: "
                          + ", ".join(apart[:8]) + (" …" if len(apart) > 8 else "") + ")")
                         if (apart := paths_apart(ms)) else "")
                      for ms, names in by_setting.items())
    return ["", f"{DAGGER} seeds ran on more than one machine or kernel setting ({named}): on "
            "CPU, one seed gives the same accuracy only on one machine."]


def details(summary, body):
    """`body` (Markdown lines) folded under `summary`; the blank lines let GitHub render the
    Markdown inside."""
    return "\n".join(["", f"<details><summary>{summary}</summary>", ""] + body
                     + ["", "</details>"]) + "\n"


def one_value(vals):
    """Whether every run gave the same recorded value (none missing)."""
    s = pd.Series(list(vals), dtype=object)
    return len(s) > 0 and not s.isna().any() and len(set(map(repr, s))) == 1


def fixed_columns(t):
    """Indices of the metric columns in which every line with 2 or more runs gives one value
    in all of them: a model's size or GFLOPs, not a measurement."""
    cols = t.grid["columns"] + t.grid["extra"]
    out = []
    for i, c in enumerate(cols):
        seen = [one_value(line.done[f"value_{i}"]) for line in t.lines
                if "metric" in c and len(line.done) > 1]
        if seen and all(seen):
            out.append(i)
    return out


def fixed_note(t, fixed):
    """A line for each column of `fixed`: the value each line's runs gave, and the study's."""
    cols = t.grid["columns"] + t.grid["extra"]
    out = []
    for i in fixed:
        c, groups = cols[i], {}
        for line in t.lines:
            if len(line.done):
                study = line.row["study"].get(c["label"])
                key = (fmt(line.done[f"value_{i}"].iloc[0], c.get("fmt")),
                       "" if study is None else f" (study {fmt(study, c.get('fmt'))})")
                groups.setdefault(key, []).append(label_of(line))
        if len(groups) == 1:
            (value, study), = groups
            out.append(f"- {c['label']}: {value} in every run{study}")
        else:
            out.append(f"- {c['label']}: " + "; ".join(f"{', '.join(names)}: {value}{study}"
                                                       for (value, study), names
                                                       in groups.items()))
    return ["", "Equal in every run of a line, so not in the table:", ""] + out if out else []


def unplaced_note(t):
    """A line naming the finished runs whose record holds neither their load nor when they
    were timed (older records): no mark can be given or ruled out for them."""
    names = sorted(unplaced(t.grid, t.by_row))
    total = sum(len(line.done) for line in t.lines)
    if not names:
        return []
    return ["", f"Load and timing window not on record for {len(names)} of {total} finished "
            f"runs (recorded before runs measured them): no `loaded` or `overlapped` mark can "
            f"be given or ruled out, so their timings count: "
            + ", ".join(f"`{n}`" for n in names[:40]) + (" …" if len(names) > 40 else "") + "."]


def full(t):
    """The full table, folded, with what goes under it; how to run the rows that need a GPU
    and the failures after it."""
    grid, fixed = t.grid, fixed_columns(t)
    cols = [c for i, c in enumerate(grid["columns"] + grid["extra"]) if i not in fixed]
    compared = {c["label"] for c in grid["columns"] if "metric" in c}
    head = ["row", "state"]
    for c in cols:
        head += [f"{c['label']} (ours)", "study", "Δ"] if c["label"] in compared \
            else [c["label"]]
    rows = [[line.row["id"], "; ".join([line.state] + differs(line))]
            + [x for c in cols for x in full_cells(line, c, compared)] for line in t.lines]
    body = markdown(head, rows) + dagger_note(t.lines, [c["label"] for c in cols
                                                        if "metric" in c])
    body += fixed_note(t, fixed) + unplaced_note(t) + placement_note(t.by_row)
    after = gpu_note(grid, t.by_row) + failures(t.by_row)
    return details("Full table: every column, every line", body) + \
        ("\n".join(after) + "\n" if after else "")


def full_cells(line, c, compared):
    """The full table's cells of column c: ours, study and Δ where it is compared."""
    if "param" in c:
        return [line.params[c["label"]]]
    x = line.cells[c["label"]]
    return [x.ours, x.study, x.delta] if c["label"] in compared else [x.ours]


def method(paragraphs):
    """## Method: the table's legend, then `paragraphs` (report.claims')."""
    return "\n## Method\n\n" + "\n\n".join([LEGEND] + list(paragraphs)) + "\n"


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
