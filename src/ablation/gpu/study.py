"""The study's GPU half as one command for a lent GPU machine (bench/gpu_study.sh calls it).

    python -m ablation.gpu.study stage                  # here: raw datasets into data/gpu_stage
    python -m ablation.gpu.study run --out OUT [--budget-s S] [--only-missing] [--rehearse]
        [--packing auto|solo|processes|mps|fused] [--workers N] [--rows table3:r01 ...]
    python -m ablation.gpu.study plan [--only-missing]  # the runs and their forecast, nothing run

The GPU machine has no DVC, dvclive, fvcore or ray, and only the checkout travels there. So
`stage` copies the raw IDX files from DATA_MIRROR into data/gpu_stage (git-ignored, carried),
with the commit they go with; `run` prepares both datasets from them (prepare.main, digests
checked there as here), trains every GPU run of Table 1 and Table 3 (rows with train.device
cuda) with the train stage's own code, several at once (gpu/launch.py), and keeps one archive
in OUT up to date after every finished run (record/archive.py), so a command cut off by its time
limit still returns what finished. `report --add` takes the archive into the record.

--rehearse does every step at toy size on the CPU (a few hundred images, one epoch), into the
same archive layout, and names its runs `<grid>-<row>-rehearsal-s<seed>` (not a dry run: a
rehearsal runs and writes; `grid --dry-run` runs and writes nothing).
"""
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

from ablation.core.cli import Parser, UserError, bounded, run
from ablation.core.io import check_outputs, write_json
from ablation.core.outputs import record_path
from ablation.gpu import launch as gpu_launch
from ablation.gpu import targets as gpu_targets
from ablation.grid.schema import load as load_grid
from ablation.grid.schema import plan as plan_grid
from ablation.record import archive as gpu_archive
from ablation.record import store
from ablation.record.run import RunId
from ablation.stages.prepare import find_raw, load_verified
from ablation.training.datasets import DATASETS, FILES

STAGE = os.path.join("data", "gpu_stage")  # carried to the GPU machine: raw files, stage.json
WORK = os.path.join("data", "gpu_work")  # prepared data, outputs, logs: never carried
GRIDS = ("grids/table1.yaml", "grids/table3.yaml")
ARCHIVE = "gpu_study.tar.gz"
DRY = {"train_limit": 256, "test_limit": 200, "epochs": 1}  # --rehearse's toy size
DRY_VARIANT = "rehearsal"


def plan_units(grids=GRIDS, seeds=1, rows=None, dry_run=False):
    """Every GPU run of the grids: [(RunId of the stage run, params)], params as the run reads
    them (a dict of sections). `rows`: only these 'grid:row' ids. A rehearsal shrinks each to
    toy size on the CPU and names it as the `rehearsal` variant."""
    out, wanted = [], set(rows or ())
    for path in grids:
        g = load_grid(path)
        for job in plan_grid(g, seeds):
            p, r = job.params, job.row
            if p["train"]["device"] != "cuda" or (wanted and f"{g['name']}:{r['id']}"
                                                  not in wanted):
                continue
            rid = job.id
            if dry_run:
                rid = dataclasses.replace(rid, variant=DRY_VARIANT)
                p = {**p, "data": {**p["data"], "train_limit": DRY["train_limit"]},
                     "train": {**p["train"], "device": "cpu", "epochs": DRY["epochs"],
                               "small_maps": False, "channels_last": True}}
            for ds in p["data"]["datasets"]:
                for m in p["train"]["models"]:
                    out.append((rid.unit("train", ds, m), p))
    known = {f"{load_grid(p)['name']}:{r['id']}" for p in grids for r in load_grid(p)["rows"]}
    unknown = sorted(wanted - known)
    if unknown:
        raise UserError(f"--rows {bounded(unknown[0], 60)}: no such row (allowed: 'grid:row', "
                        f"e.g. table3:r01; rows: {bounded(', '.join(sorted(known)), 200)})")
    return out


def recorded_units(reports="reports"):
    """The stage runs (RunId.format()) the committed record already holds (reports/<grid>.json)."""
    held = set()
    for name in ("table1", "table3"):
        for exp, recorded in store.load(os.path.join(reports, f"{name}.json")).items():
            rid = RunId.parse(exp)
            held |= {rid.unit(*u).format() for u in recorded.units().values()
                     if rid is not None and u[0] == "train"}
    return held


def stage(mirror=None, dest=STAGE):
    """Copy each dataset's raw IDX files (verified: header and SHA-256) from DATA_MIRROR into
    `dest`, with the commit and code digest they go with; prints the folder to carry."""
    mirror = os.environ.get("DATA_MIRROR") if mirror is None else mirror
    if not mirror or not os.path.isdir(mirror):
        raise UserError(f"DATA_MIRROR={bounded(mirror or '(unset)', 100)}: not a directory "
                        f"(point it at the datasets, e.g. ../shared/datasets)")
    check_outputs(os.path.join(dest, "stage.json"))
    shutil.rmtree(os.path.join(dest, "work"), ignore_errors=True)  # the carry stays small
    files = {}
    for ds, spec in DATASETS.items():
        for key, (fname, kind) in FILES.items():
            src = find_raw(fname, [os.path.join(mirror, ds)])
            if src is None:
                raise UserError(f"{bounded(mirror)}/{ds}: no {fname}[.gz] (DATA_MIRROR must "
                                f"hold <dataset>/<IDX file>)")
            load_verified(src, kind, spec["sizes"][key.split("_")[0]], spec["shape"],
                          spec["sha256"][key])
            files[f"{ds}/{os.path.basename(src)}"] = src
    for rel, src in files.items():
        os.makedirs(os.path.join(dest, "raw", os.path.dirname(rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(dest, "raw", rel))
    commit, dirty = gpu_archive.git_state()
    write_json({"commit": commit, "dirty": dirty, "code_sha256": gpu_archive.code_digest(),
                "staged": now(), "files": sorted(files)}, os.path.join(dest, "stage.json"))
    size = sum(os.path.getsize(os.path.join(dest, "raw", f)) for f in files)
    print(f"staged {len(files)} raw files ({size / 2**20:.0f} MiB) in {dest} for commit "
          f"{(commit or 'unknown')[:10]}{' (dirty)' if dirty else ''}; carry it: "
          f'carry=["{dest}"]')


def code_state(dest=STAGE):
    """{commit, dirty, code_sha256} of the code that runs: git's where there is a repository,
    else the staged commit, dirty if the code differs from what was staged."""
    digest = gpu_archive.code_digest()
    commit, dirty = gpu_archive.git_state()
    if commit is None:
        try:
            with open(os.path.join(dest, "stage.json")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            st = {}
        commit = st.get("commit") if isinstance(st, dict) else None
        dirty = None if commit is None else bool(st.get("dirty")) or \
            st.get("code_sha256") != digest
    return {"commit": commit, "dirty": dirty, "code_sha256": digest}


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine():
    """What the runs ran on: GPU, driver, torch, CUDA, cuDNN, the host."""
    import torch
    gpu = {}
    if torch.cuda.is_available():
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30)
            parts = [s.strip() for s in q.stdout.strip().splitlines()[0].split(",")] \
                if q.returncode == 0 and q.stdout.strip() else []
        except (OSError, subprocess.TimeoutExpired):  # no nvidia-smi: torch's name only
            parts = []
        gpu = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
               "driver": parts[1] if len(parts) > 1 else None,
               "gpu_memory": parts[2] if len(parts) > 2 else None,
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return {"host": socket.gethostname(), "python": platform.python_version(),
            "torch": str(torch.__version__), "cpu_cores": os.cpu_count(), **gpu}


def prepare_data(work, dry_run, dest=STAGE):
    """{dataset: prepared .npz} from the staged raw files (the prepare stage's own checks); a
    rehearsal cuts each to toy size (the first DRY test images; train_limit does the rest)."""
    from ablation.stages.prepare import main as prepare
    out = {}
    staged = all(os.path.isdir(os.path.join(dest, "raw", ds)) for ds in DATASETS)
    if not staged and os.environ.get("DATA_MIRROR"):  # here, not on the GPU machine: stage now
        stage(dest=dest)
    for ds in DATASETS:
        path = os.path.join(work, "prepared", f"{ds}.npz")
        raw = os.path.join(dest, "raw")
        if not os.path.isdir(os.path.join(raw, ds)):
            raise UserError(f"{raw}/{ds}: no staged raw files (run `bash bench/gpu_study.sh "
                            f"--stage` here first, and carry {dest})")
        prepare(ds, path, raw_dir=raw, mirror="")
        if dry_run:
            toy(path)
        out[ds] = path
    return out


def toy(path):
    """Keep the first DRY['test_limit'] test images of a prepared file (mean/std as they were)."""
    import numpy as np

    from ablation.core.io import save_npz
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    n = DRY["test_limit"]
    d["test_images"], d["test_labels"] = d["test_images"][:n], d["test_labels"][:n]
    save_npz(d, path)


def unit_files(work, unit, params):
    """The archive members of one finished unit ({name: bytes}), read from its outputs."""
    base = os.path.join(work, "runs", unit.name)
    files = {f"runs/{unit.name}/params.json": json.dumps(params, indent=2, sort_keys=True)
             .encode()}
    stem = unit.metrics.removesuffix(".json")
    for rel in (unit.metrics, record_path(unit.metrics), f"{stem}.unit.json"):
        with open(os.path.join(base, rel), "rb") as f:
            files[f"runs/{unit.name}/{rel}"] = f.read()
    curves = os.path.join(base, stem, "plots", "metrics")
    for d, _, fs in os.walk(curves):
        for fname in sorted(fs):
            if fname.endswith(".tsv"):
                full = os.path.join(d, fname)
                with open(full, "rb") as f:
                    files[f"runs/{unit.name}/{os.path.relpath(full, base)}"] = f.read()
    return files


def write_archive(out, study, members):
    """The archive in `out`, rewritten whole (atomically) with the runs finished so far."""
    units = [u for u in study["units"].values() if "start" in u]
    for u in units:  # the runs that shared the GPU with this one at some point, itself included
        u["overlapping_runs"] = sum(v["start"] < u["end"] and u["start"] < v["end"]
                                    for v in units)
    files = {"study.json": json.dumps(study, indent=1, sort_keys=True).encode()}
    for m in members.values():
        files.update(m)
    gpu_archive.write(os.path.join(out, ARCHIVE), files)


def main(out, budget_s=None, only_missing=False, dry_run=False, packing="auto", workers=None,
         rows=None, seeds=1, work=None):
    """Run the GPU half into an archive in `out`; returns the study dict."""
    if budget_s is not None and budget_s <= 0:
        raise UserError(f"--budget-s {budget_s}: allowed: a number of seconds > 0")
    check_outputs(os.path.join(out, ARCHIVE))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit: workers stopped
    t0 = time.monotonic()
    deadline = None if budget_s is None else t0 + budget_s
    units = plan_units(GRIDS, seeds, rows, dry_run)
    held = recorded_units() if only_missing else set()
    todo = [(u, p) for u, p in units if u.format() not in held]
    print(f"gpu_study: {len(units)} GPU runs planned, {len(units) - len(todo)} already in the "
          f"record, {len(todo)} to run{' (rehearsal: toy size on the CPU)' if dry_run else ''}",
          flush=True)
    work = work or WORK
    shutil.rmtree(work, ignore_errors=True)
    data = prepare_data(work, dry_run)
    study = {"format": 1, "dry_run": dry_run, "started": now(), "budget_s": budget_s,
             "only_missing": only_missing, "code": code_state(), "machine": machine(),
             "units": {u.format(): {**dataclasses.asdict(u), "status": "recorded"
                                    if u.format() in held else "planned"} for u, _ in units}}
    members = {}

    def finished(unit, params, status):
        study["units"][unit.format()].update(status)
        if status.get("status") == "done":
            members[unit.format()] = unit_files(work, unit, params)
        write_archive(out, study, members)
    write_archive(out, study, members)  # an archive from the start, whatever happens next
    launch = gpu_launch.Launcher(work, data, dry_run, deadline, finished,
                                 DRY["test_limit"] if dry_run else gpu_launch.TEST_IMAGES)
    if todo:  # nothing to run: nothing to measure either
        study["packing"] = launch.choose(todo, packing, workers)
        write_archive(out, study, members)
        launch.run(todo)
    study["finished"] = now()
    study["wall_s"] = time.monotonic() - t0
    write_archive(out, study, members)
    done = sum(u["status"] == "done" for u in study["units"].values())
    print(f"gpu_study: {done}/{len(todo)} runs finished in {study['wall_s']:.0f} s; archive "
          f"{os.path.join(out, ARCHIVE)} (take it in: python -m ablation.report --add "
          f"{ARCHIVE})", flush=True)
    return study


def _cli(argv):
    ap = Parser(prog="python -m ablation.gpu.study",
                description="The study's GPU runs (Table 1, Table 3's GPU rows) as one command "
                            "for a GPU machine without DVC; results in one archive.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="copy the raw datasets into data/gpu_stage (run here)")
    st.add_argument("--mirror", help="the datasets folder (default: $DATA_MIRROR)")
    for name in ("run", "plan"):
        p = sub.add_parser(name, allow_abbrev=False,  # --reh must not pass for --rehearse
                           help="train the GPU runs" if name == "run" else
                           "list the GPU runs, run nothing")
        p.add_argument("--only-missing", action="store_true",
                       help="skip runs the committed record (reports/<grid>.json) holds")
        p.add_argument("--rows", nargs="+", metavar="GRID:ROW", help="only these rows")
        p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
        p.add_argument("--rehearse", dest="dry_run", action="store_true",
                       help="a rehearsal: every step at toy size on the CPU (it runs and "
                            "writes)")
    r = sub.choices["run"]
    r.add_argument("--out", default=os.environ.get("OUT"), help="archive folder (default $OUT)")
    r.add_argument("--budget-s", type=float, help="start no run that cannot end before this")
    r.add_argument("--packing", default="auto", choices=gpu_launch.PACKINGS,
                   help="how runs share the GPU (auto: the fastest measured)")
    r.add_argument("--workers", type=int, help="runs or packs at once (default: measured)")
    sub.add_parser("summary", help="the targets beside what a run measured").add_argument(
        "out", help="the folder run wrote (its archive and bench.json)")
    sub.add_parser("_job").add_argument("spec")  # a worker process (gpu/launch.py)
    a = ap.parse_args(argv)
    if a.cmd == "stage":
        return stage(a.mirror)
    if a.cmd == "summary":
        return gpu_targets.summary(a.out, ARCHIVE)
    if a.cmd == "_job":
        return gpu_launch.job_main(a.spec)
    if a.seeds < 1:
        raise UserError(f"--seeds {a.seeds}: allowed: an integer >= 1")
    if a.cmd == "plan":
        held = recorded_units() if a.only_missing else set()
        for u, p in plan_units(GRIDS, a.seeds, a.rows, a.dry_run):
            print(f"{'skip (recorded)' if u.format() in held else 'run'}  {u.format()}  "
                  f"{p['train']['epochs']} epochs, batch {p['train']['batch_size']}")
        return
    if not a.out:
        raise UserError("--out: required (or set OUT)")
    if a.workers is not None and not 1 <= a.workers <= 64:
        raise UserError(f"--workers {a.workers}: allowed: an integer in [1, 64]")
    main(a.out, a.budget_s, a.only_missing, a.dry_run, a.packing, a.workers, a.rows, a.seeds)


if __name__ == "__main__":
    run(_cli)
