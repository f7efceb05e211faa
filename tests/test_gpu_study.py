"""The GPU study's command (bench/gpu_study.sh, gpu.study, gpu.launch, record.archive) and the
record's side of it (report --add, gpu.intake): the archive's checks, the launcher's budget,
--only-missing, and a rehearsal end to end without the modules the GPU machine lacks."""
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from ablation.core.cli import UserError
from ablation.gpu import launch as gpu_launch
from ablation.gpu import study as gpu_study
from ablation.record import archive as gpu_archive
from ablation.record.run import Run, RunId
from ablation.training.live import TsvLive

from .helpers import ROOT

BLOCKED = ("dvc", "dvclive", "fvcore", "ray")  # not on the GPU machine


def _blocker(tmp_path, names=BLOCKED):
    """A folder whose sitecustomize.py makes importing any of `names` fail, as there."""
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(names)!r}:\n"
        "            raise ImportError(f'{name}: not on the GPU machine')\n"
        "sys.meta_path.insert(0, Block())\n")
    return str(block)


# ---- the archive ---------------------------------------------------------------------------

def _files():
    return {"study.json": b'{"units": {}}', "runs/t-r1-s0/params.json": b"{}",
            "runs/t-r1-s0/metrics/resnet/mnist/resnet18.json": b'{"test_accuracy": 99.0}'}


def _retar(src, dst, change):
    """Copy archive `src` to `dst` with `change(name, data) -> data or None (drop)` applied,
    leaving the manifest as it was."""
    with tarfile.open(src, "r:gz") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_archive_round_trip_is_byte_stable(tmp_path):
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    gpu_archive.write(a, _files())
    gpu_archive.write(b, dict(reversed(list(_files().items()))))
    assert a.read_bytes() == b.read_bytes()  # same runs, same bytes: adding twice is a no-op
    assert gpu_archive.read(str(a)) == _files()


@pytest.mark.parametrize("fault, message", [
    ("tampered", "does not match its SHA-256"),
    ("dropped", "listed in the manifest but missing"),
    ("extra", "is not in the manifest"),
    ("truncated", "truncated gzip stream"),
    ("bomb", "uncompressed"),
    ("foreign", "no manifest.json"),
    ("traversal", "is not allowed"),
    ("symlink", "is not a regular file"),
])
def test_archive_refuses_what_is_not_ours(tmp_path, fault, message):
    good, bad = tmp_path / "good.tar.gz", tmp_path / "bad.tar.gz"
    gpu_archive.write(good, _files())
    run = "runs/t-r1-s0/metrics/resnet/mnist/resnet18.json"
    if fault == "tampered":
        _retar(good, bad, lambda n, d: d.replace(b"99.0", b"99.9") if n == run else d)
    elif fault == "dropped":
        _retar(good, bad, lambda n, d: None if n == run else d)
    elif fault == "extra":
        gpu_archive.write(tmp_path / "x.tar.gz", {**_files(), "runs/t-r1-s0/extra.json": b"1"})
        with tarfile.open(good, "r:gz") as t:
            manifest = t.extractfile("manifest.json").read()
        _retar(tmp_path / "x.tar.gz", bad, lambda n, d: manifest if n == "manifest.json" else d)
    elif fault == "truncated":
        bad.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    elif fault == "bomb":  # tarfile would read a PAX header this size whole
        bad.write_bytes(gzip.compress(b"\0" * (gpu_archive.MAX_TOTAL_BYTES + (2 << 20))))
    elif fault == "foreign":
        with tarfile.open(bad, "w:gz") as t:
            t.add(os.path.join(ROOT, "params.yaml"), arcname="params.yaml")
    else:
        with tarfile.open(bad, "w:gz") as t:
            info = tarfile.TarInfo("../evil" if fault == "traversal" else "runs/link")
            if fault == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError, match=message):
        gpu_archive.read(str(bad))


def test_tsv_curves_match_dvclive_byte_for_byte(tmp_path):
    """Without dvclive (the GPU machine) the train stage writes the same curve files."""
    from dvclive import Live
    ours = TsvLive(str(tmp_path / "ours"))
    theirs = Live(str(tmp_path / "dvclive"), save_dvc_exp=False, dvcyaml=None, report=None)
    for live in (ours, theirs):
        for step, v in enumerate([0.5, 1 / 3, float("nan"), 97.25]):
            live.log_metric("train/loss", v)
            live.log_metric("test/accuracy", 100 - step / 7)
            live.next_step()
        live.log_sklearn_plot("confusion_matrix", [0, 1, 2], [0, 2, 2],
                              name="confusion_matrix.json")
        live.end()
    for rel in ("plots/metrics/train/loss.tsv", "plots/metrics/test/accuracy.tsv",
                "plots/sklearn/confusion_matrix.json"):
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "dvclive" / rel).read_bytes()


# ---- the launcher: longest first, under a time budget ----------------------------------------

class _FakeProc:
    """A worker that ends (exit 0) `seconds` after it started."""
    pid = -1

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def poll(self):
        return 0 if time.monotonic() >= self.end else None

    def wait(self):
        return 0


def test_launcher_starts_longest_first_skips_what_cannot_finish_and_cuts_at_the_deadline(
        tmp_path, monkeypatch):
    units = {name: RunId("t", name, seed=0).unit("train", "mnist", "resnet18")
             for name in ("big", "mid", "slow", "small")}
    forecast = {"big": 60.0, "mid": 0.9, "slow": 0.8, "small": 0.1}  # seconds
    actual = {"big": 0.1, "mid": 0.2, "slow": 30.0, "small": 0.1}
    params = {"data": {"train_limit": None}, "train": {"epochs": 1, "batch_size": 16}}
    seen, started = [], []
    launch = gpu_launch.Launcher(str(tmp_path), {"mnist": "m.npz"}, True, time.monotonic() + 1.5,
                                 lambda u, p, st: seen.append((u.row, st["status"])))
    launch.choice = {"mode": "solo", "workers": 1, "pack_size": 1,
                     "candidates": {"solo": {"images_per_s": 1.0}}}
    monkeypatch.setattr(launch, "forecast", lambda job: forecast[job[0][0].row])
    monkeypatch.setattr(launch, "spawn", lambda spec, env=None, at_once=1: (
        started.append(RunId.parse(spec["units"][0]["unit_info"]["key"]).row),
        _FakeProc(actual[started[-1]]))[1])
    monkeypatch.setattr(gpu_launch.os, "killpg", lambda pid, sig: None)
    t0 = time.monotonic()
    launch.run([(u, params) for u in units.values()])
    assert started == ["mid", "slow"]  # longest first among those that fit; big never starts
    assert dict(seen) == {"mid": "done", "slow": "cut", "big": "skipped", "small": "skipped"}
    assert time.monotonic() - t0 < 5  # the slow one was stopped at the deadline


def test_only_missing_skips_what_the_record_holds(tmp_path, monkeypatch):
    shutil.copytree(os.path.join(ROOT, "grids"), tmp_path / "grids")
    shutil.copy(os.path.join(ROOT, "params.yaml"), tmp_path)
    (tmp_path / "reports").mkdir()
    entry = {"state": "success", "rev": None, "timestamp": "2026-12-01T00:00:00",
             "data": {"params": {}, "metrics": {
                 "metrics/resnet/fashion_mnist/resnet18.json": {"data": {}}}}}
    (tmp_path / "reports" / "table3.json").write_text(json.dumps(
        {"grid": "table3", "runs": {"table3-r01-s0": entry}}))
    monkeypatch.chdir(tmp_path)
    held = gpu_study.recorded_units()
    assert held == {"table3-r01-s0:train@fashion_mnist-resnet18"}
    units = gpu_study.plan_units()
    assert len(units) == 37  # Table 1: 8 rows x 2 datasets x 2 models; Table 3: 5 GPU rows
    # reading the record needs none of what the GPU machine lacks (nor pandas, nor matplotlib)
    r = subprocess.run([sys.executable, "-m", "ablation.gpu.study", "plan", "--only-missing",
                        "--rows", "table3:r01", "table3:r03"], capture_output=True, text=True,
                       env=_env([_blocker(tmp_path, BLOCKED + ("pandas", "matplotlib"))]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "skip (recorded)  table3-r01-s0:train@fashion_mnist-resnet18  5 epochs, batch 16",
        "run  table3-r03-s0:train@fashion_mnist-resnet18  15 epochs, batch 16"]


@pytest.mark.parametrize("args, message", [
    (["run", "--out", "o", "--budget-s", "-1"], "--budget-s -1.0: allowed"),
    (["run", "--out", "o", "--rows", "table9:r1"], "--rows table9:r1: no such row"),
    (["run", "--out", "o", "--packing", "magic"], "invalid choice"),
    (["run", "--out", "o", "--workers", "0"], "--workers 0: allowed"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "ablation.gpu.study", *args], cwd=ROOT,
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1
    assert not os.path.exists(os.path.join(ROOT, "o"))


# ---- a rehearsal end to end, as the GPU machine would run it ---------------------------------

def _env(extra_path=()):
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*extra_path, os.path.join(ROOT, "src")]), "PATH": os.path.dirname(sys.executable)
        + os.pathsep + os.environ["PATH"]}


def _scratch(tmp_path):
    """A copy of the checkout's files the command reads, as a git + DVC repository (the
    report reads DVC's experiments)."""
    work = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "src", "bench", "grids", "reports", "params.yaml",
                            "dvc.yaml", ".gitignore"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    for f in files:
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(work / os.path.dirname(f), exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), work / f)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=work, check=True, env=_env(), capture_output=True)
    return work


def _digests(d):
    return {p: gpu_archive.digest(open(os.path.join(d, p), "rb").read())
            for p in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, p))}  # not models/


@pytest.mark.slow
def test_rehearsal_end_to_end_without_dvc_then_report_add(tmp_path, mirror):
    work = _scratch(tmp_path)
    env = {**_env([_blocker(tmp_path)]), "DATA_MIRROR": mirror}
    out = tmp_path / "out"
    r = subprocess.run(["bash", "bench/gpu_study.sh", "--stage"], cwd=work, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'carry=["data/gpu_stage"]' in r.stdout
    r = subprocess.run(["bash", "bench/gpu_study.sh", "--rehearse", "--packing", "fused",
                        "--rows", "table3:r01", "table3:r05", "table3:r06"], cwd=work,
                       env={**env, "OUT": str(out)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert 1 <= len(files) <= 8 and "gpu_study.tar.gz" in files and "summary.md" in files
    assert all(os.path.getsize(out / f) < 16 << 20 for f in files)
    members = gpu_archive.read(str(out / "gpu_study.tar.gz"))
    study = json.loads(members["study.json"])
    assert study["dry_run"] and study["packing"]["mode"] == "fused"
    assert {u["status"] for u in study["units"].values()} == {"done"}
    assert study["code"]["commit"] and study["code"]["code_sha256"]
    base = "runs/table3-r01-rehearsal-s0/metrics/resnet/fashion_mnist/resnet18"
    record = json.loads(members[f"{base}.run.json"])
    assert record["packing"] == "fused" and record["gpu_shared_by"] >= 2
    assert record["loader"] == "resident" and record["channels_last"] is True
    unit = json.loads(members[f"{base}.unit.json"])
    assert len(unit["weights_sha256"]) == 64
    curve = members[f"{base}/plots/metrics/test/accuracy.tsv"].decode().splitlines()
    assert curve[0] == "step\taccuracy" and len(curve) == 2  # one epoch
    assert float(curve[1].split("\t")[1]) == json.loads(members[f"{base}.json"])["test_accuracy"]
    # r06 is ResNet-34: a pack of its own
    assert study["units"]["table3-r06-rehearsal-s0:train@fashion_mnist-resnet34"]["runs_in_job"] \
        == 1

    # report --add: the runs join the record; twice changes nothing; a tampered copy is refused
    add = [sys.executable, "-m", "ablation.report", "--add"]
    r = subprocess.run(add + [str(out / "gpu_study.tar.gz")], cwd=work, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "a rehearsal's archive" in r.stderr  # toy runs: only on request
    add.insert(-1, "--allow-rehearsal")
    r = subprocess.run(add + [str(out / "gpu_study.tar.gz")], cwd=work, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((work / "reports" / "table3.json").read_text())["runs"]
    assert rec["table3-r01-rehearsal-s0"]["source"]["kind"] == "gpu-archive"
    md = (work / "reports" / "table3.md").read_text()
    assert "not run by DVC" in md and "rehearsal: " in md and "| r01 | needs a GPU |" in md
    before = _digests(work / "reports")
    r = subprocess.run(add + [str(out / "gpu_study.tar.gz")], cwd=work, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "nothing new" in r.stdout
    assert _digests(work / "reports") == before
    bad = tmp_path / "tampered.tar.gz"
    _retar(out / "gpu_study.tar.gz", bad,
           lambda n, d: d.replace(b'"test_accuracy": ', b'"test_accuracy": 1') if
           n == f"{base}.json" else d)
    r = subprocess.run(add + [str(bad)], cwd=work, env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "tampered or corrupt" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert _digests(work / "reports") == before
    with gzip.open(out / "gpu_study.tar.gz") as f:  # a truncated copy: refused too
        raw = f.read()
    (tmp_path / "short.tar.gz").write_bytes(gzip.compress(raw[:len(raw) // 3]))
    r = subprocess.run(add + [str(tmp_path / "short.tar.gz")], cwd=work, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and _digests(work / "reports") == before


def test_report_add_refuses_a_consistent_archive_with_hostile_values(tmp_path, monkeypatch):
    """An archive rebuilt with a matching manifest still gets its values checked: a report
    prints them."""
    from ablation.gpu import intake as gpu_import
    from ablation.training.params import METRICS
    monkeypatch.chdir(ROOT)
    (unit, params), = [x for x in gpu_study.plan_units(rows=["table3:r01"])]
    base = f"runs/{unit.name}/{unit.metrics.removesuffix('.json')}"
    good = {"study.json": b'{"units": {}}',
            f"runs/{unit.name}/params.json": json.dumps(params).encode(),
            f"{base}.json": json.dumps({k: 1.0 for k in METRICS["train"]}).encode(),
            f"{base}.unit.json": b'{"end": 0}'}
    path = tmp_path / "a.tar.gz"
    gpu_archive.write(path, {**good, f"{base}.run.json": b'{"device_name": "H200"}'})
    runs = gpu_import.read_runs(str(path))
    assert list(runs["table3"][1]) == [unit.name]
    assert runs["table3"][1][unit.name].metrics[unit.metrics]["device_name"] == "H200"
    gpu_archive.write(path, {**good, f"{base}.run.json":
                             json.dumps({"device_name": "x" * 5000}).encode()})
    with pytest.raises(UserError, match="not a number, a short text"):
        gpu_import.read_runs(str(path))
    gpu_archive.write(path, {**good, f"{base}.run.json": b"{}",
                             "runs/table3-r99-s0/params.json": b"{}"})
    with pytest.raises(UserError, match="is no row of"):
        gpu_import.read_runs(str(path))


def test_a_later_archive_completes_a_partial_experiment(monkeypatch):
    """Table 1's experiments are 2 datasets x 2 models; what one archive lacks, the next adds,
    with the archive it came from; the same params are required, and nothing else changes."""
    from ablation.gpu import intake as gpu_import
    from ablation.report import tables as report
    from ablation.training.params import METRICS
    monkeypatch.chdir(ROOT)
    (u, params), = [x for x in gpu_study.plan_units(rows=["table1:r1"])
                    if x[0].dataset == "mnist" and x[0].model == "resnet18"]

    def entry(paths, sha, p=params):
        src = {"kind": "gpu-archive", "archive_sha256": sha}
        return Run.from_dict(u.name, {
            "state": "success", "rev": None, "timestamp": f"2026-12-01T0{len(sha)}:00:00",
            "source": src, "data": {
                "params": {"params.yaml": {"data": p}},
                "metrics": {k: {"data": dict.fromkeys(METRICS["train"], 1.0)} for k in paths},
                "curves": {k: {} for k in paths}, "sources": {k: sha for k in paths}}})
    a = "metrics/resnet/mnist/resnet18.json"
    b = "metrics/resnet/fashion_mnist/resnet50.json"
    rec, added, skipped = gpu_import.merge({}, {u.name: entry([a], "aa")})
    assert added and report.missing_units(rec[u.name]) == (1, 4)
    again, added, _ = gpu_import.merge(rec, {u.name: entry([a], "bb")})
    assert again == rec and not added  # what the record holds is kept
    rec, added, _ = gpu_import.merge(rec, {u.name: entry([a, b], "bbb")})
    assert set(rec[u.name].metrics) == {a, b}
    assert report.missing_units(rec[u.name]) == (2, 4)
    assert rec[u.name].sources == {a: "aa", b: "bbb"}
    assert rec[u.name].timestamp == "2026-12-01T03:00:00"  # the later archive's time
    assert Run.from_dict(u.name, rec[u.name].to_dict()) == rec[u.name]  # as the record keeps it
    other = {**params, "train": {**params["train"], "lr": 0.5}}
    c = "metrics/resnet/mnist/resnet50.json"
    kept, added, skipped = gpu_import.merge(rec, {u.name: entry([c], "cc", other)})
    assert kept == rec and not added and skipped
