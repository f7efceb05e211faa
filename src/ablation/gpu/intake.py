"""`python -m ablation.report --add ARCHIVE`: the GPU study's runs into the record.

Each run in the archive (record/archive.py's layout) becomes a Run (record.run) of
reports/<grid>.json, the record the report is built from: its params, its metrics files (the
metrics JSON with its .run.json record, as `dvc exp show` gives them), its per-epoch test
accuracy, and `source`: the archive's SHA-256, the GPU, driver, torch and CUDA, the commit and
whether its code was dirty, how it shared the GPU. DVC did not run these; no DVC experiment
exists for them. Everything is checked before anything is written: a truncated, foreign or
tampered archive, or one whose runs do not fit the grids, is one UserError and changes
nothing. A run already in the record is left as it is: adding the same archive twice changes
nothing, and a later archive (`--only-missing`) adds only what is new.
"""
import dataclasses
import math
import os
import re
from datetime import datetime, timezone

from ablation.core.cli import UserError, bounded
from ablation.core.outputs import curve_path, parse_metrics_path, record_path
from ablation.grid.schema import load as load_grid
from ablation.record import archive as gpu_archive
from ablation.record.run import Run, RunId
from ablation.record.store import parse_curve
from ablation.training.datasets import DATASETS
from ablation.training.models import MODELS
from ablation.training.params import METRICS, validate

RUN = re.compile(r"^runs/([A-Za-z0-9_.-]+)/(.+)$")
GRIDS_DIR = "grids"


def read_runs(path, grids_dir=GRIDS_DIR, allow_dry_run=False):
    """{grid name: (grid, {experiment: Run})} from a verified archive; UserError otherwise.
    A rehearsal's archive (toy runs on a CPU) only with `allow_dry_run` (a scratch clone)."""
    members = gpu_archive.read(path)
    study = gpu_archive.load_json(members, "study.json", path)

    def bad(what):
        raise UserError(f"{bounded(path)}: not a GPU study archive: {what} (nothing was "
                        f"changed)")
    if not isinstance(study, dict) or not isinstance(study.get("units"), dict):
        bad("study.json lacks its units")
    dry = study.get("dry_run") is True
    if dry and not allow_dry_run:
        raise UserError(f"{bounded(path)}: a rehearsal's archive (toy runs on a CPU), not "
                        f"results: add it with --allow-rehearsal, in a scratch clone (nothing "
                        f"was changed)")
    by_exp = {}
    for name in members:
        m = RUN.match(name)
        if name != "study.json" and not m:
            bad(f"unexpected member {bounded(repr(name), 80)}")
        if m:
            by_exp.setdefault(m.group(1), {})[m.group(2)] = name
    source = provenance(study, gpu_archive.file_digest(path))
    out = {}
    for exp, files in sorted(by_exp.items()):
        g = grid_of(exp, grids_dir, bad, "rehearsal" if dry else None)
        out.setdefault(g["name"], (g, {}))[1][exp] = entry_of(exp, files, members, study,
                                                              source, bad)
    if not out:
        bad("it holds no finished run")
    return out


def grid_of(exp, grids_dir, bad, variant):
    """The grid an experiment name belongs to: grids/<grid>.yaml, one of its GPU rows (as
    gpu_study names them: `variant` None, or `rehearsal` for a rehearsal), with a seed."""
    rid = RunId.parse(exp)
    path = os.path.join(grids_dir, f"{rid.grid}.yaml") if rid else None
    if rid is None or rid.stage is not None or not os.path.isfile(path):
        bad(f"run {bounded(repr(exp), 80)} names no grid of {grids_dir}/")
    g = load_grid(path)
    rows = [r for r in g["rows"] if r["id"] == rid.row]
    if not rows:
        bad(f"run {bounded(repr(exp), 80)} is no row of {path}")
    if rows[0]["params"]["train"]["device"] != "cuda" or rid.variant != variant \
            or rid.seed is None:
        bad(f"run {bounded(repr(exp), 80)} is not a GPU run of {path} as the GPU study names "
            f"them (<grid>-<row>{'-rehearsal' if variant else ''}-s<seed>, a row on cuda)")
    return g


def entry_of(exp, files, members, study, source, bad):
    """One experiment's Run (as the record keeps it) from its archive members."""
    def js(rel):
        return gpu_archive.load_json(members, files[rel], "archive") if rel in files else None
    params = js("params.json")
    try:
        checked = validate(params, ["data", "train"], source=f"{exp}/params.json")
    except UserError as e:
        bad(str(e))
    metrics, curves, ends = {}, {}, []
    for rel in files:
        unit = parse_metrics_path(rel)
        if not unit or unit[0] != "train":
            continue
        _, ds, model = unit
        if ds not in DATASETS or model not in MODELS or ds not in checked["data"]["datasets"] \
                or model not in checked["train"]["models"]:
            bad(f"{exp}: {bounded(rel, 80)} is not a run of its params")
        values, record = js(rel), js(record_path(rel))
        unit = js(rel.removesuffix(".json") + ".unit.json")
        if not isinstance(values, dict) or set(values) != set(METRICS["train"]) \
                or not isinstance(record, dict) or not isinstance(unit, dict):
            bad(f"{exp}: {bounded(rel, 80)} lacks its metrics, record or unit file")
        if not all(v is None or isinstance(v, bool) or finite(v) for v in values.values()):
            bad(f"{exp}: {bounded(rel, 80)}: a metric that is not a finite number, a bool or "
                f"null")
        if not all(plain(v) for v in (*values.values(), *record.values())):
            bad(f"{exp}: {bounded(rel, 80)} holds a value that is not a number, a short text "
                f"or a small list (at most {MAX_TEXT} characters)")
        metrics[rel] = {**record, **values}
        raw = members.get(files.get(curve_path(rel))) or b""
        curves[rel] = parse_curve(raw.decode("utf-8", "replace"))
        end = unit.get("end")
        if not finite(end) or not 0 <= end < 4e9:
            bad(f"{exp}: {bounded(rel, 80)}: its unit file lacks a plausible end time")
        ends.append(end)
    if not metrics:
        bad(f"{exp}: no metrics file")
    stamp = datetime.fromtimestamp(max(ends), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return Run(exp, "success", None, stamp, params, metrics, curves, source,
               {k: source["archive_sha256"] for k in metrics})


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_TEXT = 200  # characters of a text value a report may print (a device name, a host)


def plain(v, depth=0):
    """A value a run's metrics or record may hold: a number, a bool, None, a short text, or a
    small list or mapping of those (small_map_paths)."""
    if v is None or isinstance(v, (bool, int, float)):
        return True
    if isinstance(v, str):
        return len(v) <= MAX_TEXT
    if isinstance(v, (list, dict)) and depth < 2 and len(v) <= 200:
        items = v.values() if isinstance(v, dict) else v
        return all(plain(x, depth + 1) for x in items)
    return False


def provenance(study, sha):
    """Where the archive's runs ran, from its study.json, bounded. The commit: where the code
    that ran (its digest) is this checkout's clean code, this checkout's HEAD, checked here;
    else what the GPU machine said (the commit it was staged for, dirty if the code differed)."""
    mach = study.get("machine") if isinstance(study.get("machine"), dict) else {}
    code = study.get("code") if isinstance(study.get("code"), dict) else {}
    pack = study.get("packing") if isinstance(study.get("packing"), dict) else {}

    def s(v):
        return None if v is None else bounded(str(v), 80)
    commit, dirty = code.get("commit"), code.get("dirty")
    if code.get("code_sha256") and code.get("code_sha256") == gpu_archive.code_digest():
        head, here_dirty = gpu_archive.git_state()
        if head and here_dirty is False:
            commit, dirty = head, False
    return {"kind": "gpu-archive", "archive_sha256": sha, "dry_run": bool(study.get("dry_run")),
            "gpu": s(mach.get("gpu")), "driver": s(mach.get("driver")),
            "torch": s(mach.get("torch")), "cuda": s(mach.get("cuda")),
            "host": s(mach.get("host")), "commit": s(commit),
            "dirty": dirty if isinstance(dirty, bool) else None,
            "code_sha256": s(code.get("code_sha256")),
            "packing": s(pack.get("mode")), "workers": s(pack.get("workers")),
            "pack_size": s(pack.get("pack_size"))}


def merge(recorded, incoming):
    """The record with the incoming runs added: a run already there is kept as it is; a
    metrics file an archived experiment lacks (finished by a later archive, with the same
    params) is added, with the archive it came from. Returns (record, added, skipped)."""
    out, added, skipped = dict(recorded), [], []
    for exp, run in incoming.items():
        have = out.get(exp)
        if have is None:
            out[exp], added = run, added + [f"{exp} ({len(run.metrics)} runs)"]
            continue
        new = [k for k in run.metrics if k not in have.metrics]
        if not new:
            continue
        if not have.imported or have.params != run.params:
            skipped.append(f"{exp} (the record holds it with other params or from DVC)")
            continue
        parts = {part: {**getattr(have, part), **{k: getattr(run, part).get(k) for k in new}}
                 for part in ("metrics", "curves", "sources")}
        out[exp] = dataclasses.replace(have, **parts,
                                       timestamp=max(have.timestamp, run.timestamp))
        added.append(f"{exp} (+{len(new)} runs)")
    return out, added, skipped
