"""The forecast (grid/forecast.py, grid/speed.py): hours from a recorded speed or a calibration,
GPU figures beside a cuda run's, svm fits; `--dry-run` writes nothing on every command; the
report's "Forecast against actual"."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from ablation.core.cli import UserError
from ablation.grid import forecast as F
from ablation.grid import schema as G
from ablation.grid import speed as S
from ablation.record import dvc as D
from ablation.record.run import Run
from ablation.report import command

from .helpers import PARAMS, ROOT, warm_exp_cache
from .test_grid_report import _wait_queue, start_queue

TRAIN = "metrics/resnet/mnist/resnet18.json"
NO_CALIBRATION = "calibration not expected here"


def grid(tmp_path, text):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    return G.load(str(p), params_path=PARAMS)


def never(key, cfg):
    raise AssertionError(NO_CALIBRATION)


def train_run(name, params, ips, eval_ms, epochs, machine, threads=2, device="cpu"):
    """A finished run whose record holds one train stage run's speed."""
    return Run(name, "success", params=params, metrics={TRAIN: {
        "images_per_s": ips, "eval_time_ms": eval_ms, "epochs_completed": epochs,
        "train_time_ms": 1000.0 * epochs * 600 / ips, "device": device, "device_name": machine,
        "threads": threads}})


SMALL = ("name: k\ntargets: [train]\nset: {data.datasets: [mnist], data.train_limit: 600, "
         "train.epochs: 3, train.batch_size: 8, train.device: cpu}\nrows: [{id: a}]\n")


def test_recorded_speed_gives_the_hours_by_the_arithmetic(tmp_path, monkeypatch):
    """Two matching runs of this machine (the median of their speeds), one copy of one of them
    (counted once), and runs that do not match (another CPU, another thread count, another
    batch size): hours = epochs x (train images / train img/s + test images / eval img/s)."""
    monkeypatch.chdir(tmp_path)  # no reports/*.json here: only the runs given
    g = grid(tmp_path, SMALL)
    here, p = S.this_machine(), g["rows"][0]["params"]
    other_bs = json.loads(json.dumps(p))
    other_bs["train"]["batch_size"] = 16
    runs = {"old-a-s0": train_run("old-a-s0", p, 200.0, 4000.0, 2, here),
            "old-a-s1": train_run("old-a-s1", p, 300.0, 2000.0, 1, here),
            "old-a-s2": train_run("old-a-s1", p, 300.0, 2000.0, 1, here),  # a copy: DVC's parent
            "old-b": train_run("old-b", p, 5.0, 1.0, 1, "Other CPU (64 cores)"),
            "old-c": train_run("old-c", p, 5.0, 1.0, 1, here, threads=1),
            "old-d": train_run("old-d", other_bs, 5.0, 1.0, 1, here)}
    jobs = G.plan(g)
    ests, speeds = F.forecast(g, jobs, runs, {jobs[0].name: 2}, calibrate=never)
    # the records' own numbers: eval img/s = test images x epochs / eval s (10,000 per epoch)
    train_ips = (200.0 + 300.0) / 2
    eval_ips = (10000 * 2 / 4.0 + 10000 * 1 / 2.0) / 2
    assert ests[0].hours == pytest.approx(3 * (600 / train_ips + 10000 / eval_ips) / 3600)
    assert ests[0].source == "record" and ests[0].units == (TRAIN,) and not ests[0].gpu
    [speed] = speeds.used.values()
    assert "median of 2 recorded runs (old-a-s0, old-a-s1)" in speed.detail


def test_calibration_when_no_record_matches_and_it_writes_nothing(tmp_path, monkeypatch):
    """No run of this machine at that batch size: a real calibration (2 + 5 steps, one eval
    batch); the hours follow from its speed; the small-map cache is left as it was."""
    monkeypatch.chdir(tmp_path)
    cache = os.environ["ABLATION_CACHE_DIR"]  # conftest's: the tuner's cache during the tests

    def files(d):
        paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
        return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    before = files(cache)
    g = grid(tmp_path, SMALL.replace("train.batch_size: 8", "train.batch_size: 4"))
    jobs = G.plan(g)
    ests, speeds = F.forecast(g, jobs, {}, {jobs[0].name: 1})
    [speed] = speeds.used.values()
    assert speed.source == "calibration" and ests[0].source == "calibration"
    assert 1 < speed.train_ips < 1e5 and 1 < speed.eval_ips < 1e6
    assert ests[0].hours == pytest.approx(
        3 * (600 / speed.train_ips + 10000 / speed.eval_ips) / 3600)
    assert files(cache) == before and os.listdir(tmp_path) == ["g.yaml"]


def test_cuda_runs_get_gpu_figures_beside_this_cpus(tmp_path, monkeypatch, capsys):
    """A row planned for cuda: the CPU forecast and, beside it, the study's GPU timing where the
    grid holds one (img/s = images x epochs / time; training only), else "no GPU run on
    record"; our own cuda run wins over the study."""
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path, "name: c\ntargets: [train]\nset: {data.datasets: [mnist], "
                       "train.device: cuda, train.epochs: 5}\n"
                       "columns: [{label: t, metric: train_time_ms}]\n"
                       "rows: [{id: a, study: {t: 400000}},\n"
                       "       {id: b, set: {train.batch_size: 32}}]\n")
    jobs = G.plan(g)
    ests, speeds = F.forecast(g, jobs, {}, {j.name: 2 for j in jobs},
                              calibrate=lambda key, cfg: (100.0, 1000.0))
    a, b = ests
    assert a.gpu and a.gpu_source == "study GPU"
    assert a.gpu_hours == pytest.approx(5 * 60000 / (60000 * 5 / 400.0) / 3600)
    assert a.hours == pytest.approx(5 * (60000 / 100.0 + 10000 / 1000.0) / 3600)
    assert b.gpu_hours is None and b.gpu_source == "no GPU run on record"
    F.report(ests, speeds)
    out = capsys.readouterr().out
    assert "GPU h" in out and "no GPU run on record" in out and "[study GPU:" in out
    ours = train_run("c-a-s0", g["rows"][0]["params"], 2000.0, 500.0, 1, "NVIDIA H200",
                     device="cuda")
    ests, _ = F.forecast(g, jobs[:1], {"c-a-s0": ours}, {jobs[0].name: 2},
                         calibrate=lambda key, cfg: (100.0, 1000.0))
    assert ests[0].gpu_source == "GPU record"
    assert ests[0].gpu_hours == pytest.approx(5 * (60000 / 2000.0 + 10000 / 20000.0) / 3600)


def test_svm_fit_from_this_machines_record_else_no_estimate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grid(tmp_path, "name: s\ntargets: [svm]\nset: {data.datasets: [mnist], "
                       "svm.kernels: [rbf], svm.train_samples: 500}\nrows: [{id: a}]\n")
    jobs = G.plan(g)
    ests, _ = F.forecast(g, jobs, {}, {jobs[0].name: 2}, calibrate=never)
    assert ests[0].hours is None and ests[0].source == "no estimate"
    p, here = g["rows"][0]["params"], S.this_machine()

    def fit(name, ms, machine):
        return Run(name, "success", params=p, metrics={"metrics/svm/mnist/rbf.json": {
            "train_time_ms": ms, "train_samples": 500, "device_name": machine}})
    runs = {"s-a-s0": fit("s-a-s0", 1200.0, here), "s-a-s1": fit("s-a-s1", 1800.0, here),
            "s-a-s2": fit("s-a-s2", 9e6, "Other CPU (64 cores)")}
    ests, _ = F.forecast(g, jobs, runs, {jobs[0].name: 2}, calibrate=never)
    assert ests[0].hours == pytest.approx(1500.0 / 3.6e6) and ests[0].source == "svm record"


def test_report_sets_the_forecast_against_what_ran(tmp_path, monkeypatch):
    """The forecast file that `grid queue` saves, then the report: the run's forecast, its
    recorded train + eval time, and the ratio; a damaged forecast file is one clear error,
    exit status 2 from the command line, before anything is written."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    g = grid(tmp_path, SMALL)
    jobs = G.plan(g)
    ests, speeds = F.forecast(g, jobs, {}, {jobs[0].name: 2},
                              calibrate=lambda key, cfg: (100.0, 1000.0))
    out = tmp_path / "out"
    F.save(g, ests, speeds, folder=str(out))
    saved = json.loads((out / "k.forecast.json").read_text())
    assert saved["runs"]["k-a"]["hours"] == pytest.approx(ests[0].hours)
    assert saved["machine"] == speeds.machine and saved["date"] and saved["sources"]
    ran = Run("k-a", "success", timestamp="2026-01-01T10:00:00", params=g["rows"][0]["params"],
              metrics={TRAIN: {"test_accuracy": 90.0, "train_time_ms": 30000.0,
                               "eval_time_ms": 6000.0, "device": "cpu"}})
    command.main(str(tmp_path / "g.yaml"), str(out), runs={"k-a": ran})
    md = (out / "k.md").read_text()
    assert "## Forecast against actual" in md
    line = next(x for x in md.splitlines() if x.startswith("| k-a |"))
    actual = 36000.0 / 3.6e6
    assert f"| {F.hours(actual)} | {actual / ests[0].hours:.2f} |" in line
    assert "(CPU: calibration)" in line
    (out / "k.forecast.json").write_text('{"runs": {"k-a": {"hours": "soon"}}}')
    with pytest.raises(UserError, match=r"k.forecast.json: not a forecast file: run 'k-a'"):
        command.main(str(tmp_path / "g.yaml"), str(out), runs={})
    r = subprocess.run([sys.executable, "-m", "ablation.report", "g.yaml", "--out", "out"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a forecast file" in r.stderr


def test_forecasts_of_several_queue_calls_keep_their_machine_and_a_gpu_run_no_cpu_ratio(
        tmp_path, monkeypatch):
    """Runs queued on two days, on two machines, share one forecast file: each row names the
    machine and day it was forecast on, and the file keeps the speeds both came from. A run
    that ran on a GPU with only a CPU forecast is labelled CPU and given no ratio."""
    from ablation.report import forecast as RF
    monkeypatch.chdir(tmp_path)
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    g = grid(tmp_path, SMALL.replace("rows: [{id: a}]", "rows: [{id: a}, {id: b}]"))
    jobs, out = G.plan(g), str(tmp_path / "out")
    for job, ips, machine in ((jobs[0], 100.0, "Machine One"), (jobs[1], 50.0, "Machine Two")):
        monkeypatch.setattr(S, "this_machine", lambda m=machine: m, raising=False)
        ests, speeds = F.forecast(g, [job], {}, {job.name: 2},
                                  calibrate=lambda key, cfg, ips=ips: (ips, 1000.0))
        speeds.machine = machine
        F.save(g, ests, speeds, folder=out)
    fc = F.load(os.path.join(out, "k.forecast.json"))
    assert [fc["runs"][n]["machine"] for n in ("k-a", "k-b")] == ["Machine One", "Machine Two"]
    assert len(fc["sources"]) == 2  # one calibration each, both kept
    md = RF.section(fc, {})
    row_a = next(x for x in md.splitlines() if x.startswith("| k-a |"))
    assert "| Machine One " in row_a and "| not run |" in row_a
    gpu_run = Run("k-b", "success", params=jobs[1].params, metrics={TRAIN: {
        "train_time_ms": 1000.0, "eval_time_ms": 100.0, "device": "cuda"}})
    cells = RF.line("k-b", fc["runs"]["k-b"], gpu_run)
    assert cells[3].endswith("(CPU: calibration)") and cells[5] == "— (ran on a GPU)"
    # forecast on Machine One, run (again) on another CPU: its hours, no ratio
    moved = Run("k-a", "success", params=jobs[0].params, metrics={TRAIN: {
        "train_time_ms": 3.6e6, "eval_time_ms": 0.0, "device": "cpu",
        "device_name": "Machine Three"}})
    cells = RF.line("k-a", fc["runs"]["k-a"], moved)
    assert cells[4:] == [F.hours(1.0), "— (ran on Machine Three)"]
    here = Run("k-a", "success", params=jobs[0].params, metrics={TRAIN: {
        "train_time_ms": 3.6e6, "eval_time_ms": 0.0, "device": "cpu",
        "device_name": "Machine One"}})
    assert RF.line("k-a", fc["runs"]["k-a"], here)[5] == f"{1.0 / fc['runs']['k-a']['hours']:.2f}"


def snapshot(repo, env):
    """What a dry run must leave as it was: every file (content and mtime) of the clone, .git
    included, except .dvc/tmp (DVC's own scratch: `dvc exp show` may keep caches and locks
    there) and .git/index (`git status` refreshes its stat cache); git's view of the tree,
    ignored files included; and DVC's queue."""
    files = {}
    for d, dirs, names in os.walk(repo):
        rel = os.path.relpath(d, repo)
        if rel in (os.path.join(".dvc", "tmp"),):
            dirs[:] = []
            continue
        for n in names:
            p = os.path.join(d, n)
            if os.path.relpath(p, repo) != os.path.join(".git", "index") and os.path.isfile(p):
                with open(p, "rb") as f:
                    files[os.path.relpath(p, repo)] = (hashlib.sha256(f.read()).hexdigest(),
                                                       os.stat(p).st_mtime_ns)
    status = [line for line in subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=repo, capture_output=True, text=True,
        check=True).stdout.splitlines() if not line[3:].startswith(".dvc/tmp")]
    q = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=env, capture_output=True,
                       text=True, check=True).stdout
    return files, status, q


def scratch_repo(tmp_path, mirror, exp_cache):
    """A clone of this repository with the working tree's pipeline and code committed (the
    stages run the installed package, the working tree's), its own DVC remote. Its git objects
    are its own files (--no-hardlinks): a local clone hard-links them to this repository's,
    which every other test's clone shares, and git touches an object it writes again (the
    same blob committed in another test's clone moved this one's mtimes under the snapshot)."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", ROOT, str(repo)], check=True)
    warm_exp_cache(repo, exp_cache)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "src", "params.yaml",
                             "dvc.yaml"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    for f in listed:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(repo / f), exist_ok=True)
            shutil.copy(os.path.join(ROOT, f), repo / f)
    env = dict(os.environ, DATA_MIRROR=mirror,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "working tree", "--allow-empty"], cwd=repo, check=True)
    subprocess.run(["dvc", "remote", "modify", "--local", "storage", "url",
                    str(tmp_path / "storage")], cwd=repo, env=env, check=True)
    return repo, env


@pytest.mark.slow
def test_dry_run_writes_nothing_then_skips_what_ran_and_forecasts_from_it(
        mirror, tmp_path, monkeypatch, exp_cache):
    """Through real DVC on a shrunk grid (ResNet-18, 96 MNIST images, 500 test images, 1 epoch):
    `--dry-run` on queue, run and sbatch changes no file, no git state and no queue entry, and
    forecasts from a calibration (nothing recorded at batch 8 yet); a plain queue saves the
    forecast; after the
    run succeeded a dry run lists it as skipped and forecasts the other row from its record, by
    the arithmetic on that record's numbers; the report sets the forecast against the run."""
    repo, env = scratch_repo(tmp_path, mirror, exp_cache)
    (repo / "grids" / "fc.yaml").write_text(
        "name: fc\ntargets: [train]\nset: {data.datasets: [mnist], data.train_limit: 96, "
        "data.test_limit: 500, train.epochs: 1, train.batch_size: 8, train.device: cpu}\n"
        "columns: [{label: acc %, metric: test_accuracy, fmt: .2f}]\n"
        "rows: [{id: a, set: {train.lr: 0.001}}, {id: b, set: {train.lr: 0.002}}]\n")
    subprocess.run(["git", "add", "grids/fc.yaml"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fc"],
                   cwd=repo, check=True)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=repo, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def dry_runs():
        before = snapshot(repo, env)
        outs = {c: cli("ablation.grid", c, "grids/fc.yaml", "--dry-run")
                for c in ("queue", "run", "sbatch")}
        assert snapshot(repo, env) == before  # not a file, not a ref, not a queue entry
        return outs

    outs = dry_runs()
    assert outs["queue"].count("dvc exp run --queue -n fc-") == 2
    assert "would run fc-a" in outs["run"] and "would run fc-b" in outs["sbatch"]
    assert all("calibration" in o and "dry run: nothing queued" in o for o in outs.values())

    out = cli("ablation.grid", "queue", "grids/fc.yaml", "--rows", "a")
    assert "queued 1 experiment(s)" in out and "forecast saved to" in out
    saved = json.loads((repo / "reports" / "fc.forecast.json").read_text())
    assert list(saved["runs"]) == ["fc-a"] and saved["runs"]["fc-a"]["source"] == "calibration"
    start_queue(repo, env, 1)
    assert "Success" in _wait_queue(repo, env)

    outs = dry_runs()
    for o in outs.values():
        assert "skip fc-a: already success" in o and "skipped (recorded or in the queue): fc-a" \
            in o and "fc-b" in o
    line_b = next(x for x in outs["queue"].splitlines() if x.startswith("fc-b "))
    assert line_b.split()[-1] == "record"
    monkeypatch.chdir(repo)  # the forecast as the command makes it, from fc-a's record
    runs = D.experiments()
    g = G.load("grids/fc.yaml")
    v = runs["fc-a"].values(TRAIN)
    ests, _ = F.forecast(g, [j for j in G.plan(g) if j.name == "fc-b"], runs,
                         {"fc-b": v["threads"]}, calibrate=never)
    assert v["test_images"] == 500
    eval_ips = 500 * v["epochs_completed"] / (v["eval_time_ms"] / 1000)
    expect = 1 * (96 / v["images_per_s"] + 500 / eval_ips) / 3600
    assert ests[0].hours == pytest.approx(expect) and ests[0].source == "record"
    assert F.hours(expect) in line_b

    cli("ablation.report", "grids/fc.yaml")
    md = (repo / "reports" / "fc.md").read_text()
    line_a = next(x for x in md.splitlines() if x.startswith("| fc-a |"))
    actual = (v["train_time_ms"] + v["eval_time_ms"]) / 3.6e6
    assert "## Forecast against actual" in md and f"| {F.hours(actual)} |" in line_a
    assert "(CPU: calibration)" in line_a
