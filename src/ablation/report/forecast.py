"""The report's "Forecast against actual": what `grid queue` forecast for each run
(reports/<grid>.forecast.json, grid/forecast.py) beside what the run recorded.

Actual = the recorded train_time_ms + eval_time_ms of each train stage run the forecast
counted, plus the fit time (train_time_ms) of each svm stage run; like the forecast it leaves
out prepare, DVC's own time and the small-map tuning. A run that ran on a GPU is set against
the GPU forecast, where there was one.
"""
import os

from ablation.core.cli import bounded
from ablation.core.outputs import parse_metrics_path
from ablation.grid.forecast import hours as fmt_hours
from ablation.grid.forecast import load, path_of
from ablation.record.run import is_number
from ablation.report.format import markdown

TIMED = {"train": ("train_time_ms", "eval_time_ms"), "svm": ("train_time_ms",)}


def read(outdir, grid_name, committed="reports"):
    """The forecast file beside the report (in `outdir`, else the committed one); {} if none."""
    path = path_of(grid_name, outdir)
    if not os.path.exists(path):
        path = path_of(grid_name, committed)
    return load(path)


def actual_hours(run, units):
    """Hours the run recorded over `units` (metrics files); None where one lacks a time."""
    ms = 0.0
    for path in units:
        parsed, v = parse_metrics_path(path), run.values(path)
        keys = TIMED.get(parsed[0], ()) if parsed else ()
        if not keys or not all(is_number(v.get(k)) for k in keys):
            return None
        ms += sum(v[k] for k in keys)
    return ms / 3.6e6 if units else None


def fmt(h):
    return fmt_hours(h, "—")


def line(name, f, run):
    """One table line's cells: the run, what it runs, where and when it was forecast, forecast
    h and source, actual h, the ratio. A run that ran on a GPU is set against the GPU forecast;
    where there was none, its CPU forecast is shown and no ratio (another device). A CPU run
    whose record names another CPU than the forecast's machine (re-run elsewhere, or placed by
    Ray on another node) has no ratio either: the forecast measured another machine's speed."""
    state = run.state if run else "not run"
    units = f.get("units") or []
    on_gpu = bool(run and units and run.values(units[0]).get("device") == "cuda")
    use_gpu = on_gpu and f.get("gpu_hours") is not None
    hours, source = (f.get("gpu_hours"), f.get("gpu_source")) if use_gpu \
        else (f.get("hours"), f.get("source"))
    got = actual_hours(run, units) if run and run.finished else None
    ran_on = run.values(units[0]).get("device_name") if run and units else None
    elsewhere = not on_gpu and ran_on and f.get("machine") and ran_on != f.get("machine")
    ratio = f"— (ran on {bounded(str(ran_on), 60)})" if elsewhere and got is not None \
        else f"{got / hours:.2f}" if got is not None and hours and use_gpu == on_gpu \
        else "— (ran on a GPU)" if on_gpu and not use_gpu else "—"
    when = " ".join(str(x) for x in (f.get("machine"), str(f.get("date") or "")[:10]) if x)
    return [name, f.get("what") or "—", when or "—",
            f"{fmt(hours)} ({'GPU' if use_gpu else 'CPU'}: {source or '—'})",
            fmt(got) if run and run.finished else state, ratio]


def section(fc, runs):
    """The Markdown section for forecast `fc` (grid/forecast.py's file) and {name: Run};
    '' where there is no forecast. Runs queued at different times keep the machine and day
    they were forecast on: each row says its own."""
    if not fc.get("runs"):
        return ""
    out = ["", "## Forecast against actual", "",
           "Forecast by `grid queue` before each run (the machine and day in its row); the "
           "measured speeds they came from: "
           + ("; ".join(map(str, fc.get("sources") or [])) or "—") + ". Actual: each run's "
           "recorded train + eval time (train) and fit time (svm); neither counts prepare, "
           "DVC's own time or the small-map tuning.", ""]
    out += markdown(["run", "what it runs", "forecast on", "forecast h (source)", "actual h",
                     "actual / forecast"],
                    [line(n, f, runs.get(n)) for n, f in sorted(fc["runs"].items())])
    return "\n".join(out) + "\n"
