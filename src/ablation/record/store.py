"""The committed record: reports/<grid>.json, the finished runs a report was built from, kept
so the report can be rebuilt (and extended) on any clone after the experiments are gone; and
the per-epoch curves a run's dvclive files hold, read once and kept in that record.

    {"grid": "table3", "runs": {"table3-r01-s0": Run.to_dict(), ...}}
"""
import dataclasses
import json
import math
import os
import subprocess

from ablation.core.cli import UserError, bounded
from ablation.core.io import write_json
from ablation.core.outputs import curve_path
from ablation.record.run import Run

MAX_RECORDS_BYTES = 32 << 20  # a record is about 10 KB a run
MAX_CURVE_BYTES = 1 << 20


def load(path):
    """{name: Run} of the finished runs a committed record holds; {} where there is no such
    file. Anything else in the file is one UserError naming it."""
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
    out = {}
    for name, e in runs.items():
        data = e.get("data") if isinstance(e, dict) else None
        if not (isinstance(data, dict) and isinstance(data.get("params"), dict)
                and isinstance(data.get("metrics"), dict) and e.get("state") == "success"
                and isinstance(e.get("timestamp"), str)):
            bad(f"run {bounded(repr(name), 60)} lacks state, timestamp, params or metrics")
        try:
            out[name] = Run.from_dict(name, e)
        except (TypeError, ValueError, AttributeError):
            bad(f"run {bounded(repr(name), 60)}: its curves are not {{epoch: value}}")
    return out


def save(path, grid_name, runs):
    """Write the record of `runs` ({name: finished Run}), curves included."""
    write_json({"grid": grid_name, "runs": {n: r.to_dict() for n, r in sorted(runs.items())}},
               path)


def with_curves(run):
    """`run` with the per-epoch test accuracy of each train run it recorded, read from its
    experiment commit where the record does not hold it yet (a run of DVC here)."""
    if not run.rev or not run.finished:
        return run
    missing = [p for p in run.units() if run.units()[p][0] == "train" and p not in run.curves]
    got = {p: c for p in missing if (c := read_curve(run.rev, p))}
    return dataclasses.replace(run, curves={**run.curves, **got}) if got else run


def git_show(rev, path):
    """A file's text at a git revision, or None."""
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True,
                       errors="replace")  # a file's bytes are not trusted to be UTF-8
    return r.stdout if r.returncode == 0 else None


def read_curve(rev, metrics_path):
    """{epoch (from 1): test accuracy %} of the run whose metrics file is `metrics_path`, at
    git revision `rev` (None: the workspace); {} where the file is missing or is not dvclive's
    two columns (step, value)."""
    path = curve_path(metrics_path)
    if rev is None:
        text = open(path, errors="replace").read(MAX_CURVE_BYTES) if os.path.isfile(path) \
            else None
    else:
        text = git_show(rev, path)
    return parse_curve(text)


def parse_curve(text):
    """{epoch (from 1): value} of dvclive's TSV text (a header, then step<TAB>value); {}
    where it is not one, or holds a value that is not finite."""
    out = {}
    for line in (text or "").strip().splitlines()[1:]:
        try:
            step, value = line.split("\t")
            out[int(step) + 1] = float(value)
        except ValueError:
            return {}
        if not math.isfinite(out[int(step) + 1]):  # a figure cannot draw it
            return {}
    return out
