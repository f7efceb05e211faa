"""One result per params whoever runs it, never more busy threads than cores, and interrupts
that leave nothing behind and resume from the last finished epoch: the train stage as a
program, `grid queue` with a real DVC queue (one worker and two), and `grid run` on a real
local Ray cluster."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ablation.core.cores import CoreHold, machine_cores
from ablation.record import dvc as D
from ablation.training.datasets import save_prepared

from .helpers import SYNTH_CLASSES, copy_base, synthetic_arrays

BIN = os.path.dirname(sys.executable)
TIMING = {"train_time_ms", "images_per_s", "data_wait_ms", "eval_time_ms", "peak_memory_mb"}


def same_numbers(a, b):
    """The metrics two runs must share exactly: everything but the timings."""
    return {k: v for k, v in a.items() if k not in TIMING} == \
        {k: v for k, v in b.items() if k not in TIMING}


# ---- the pool of cores -------------------------------------------------------------------

def _hold(n, cores, pool, started, release, out):
    os.environ["ABLATION_CORES_DIR"] = pool
    with CoreHold(n, say=lambda t: out.put(("said", t)), cores=cores) as h:
        out.put(("held", h.waited_s))
        started.set()
        release.wait(30)


def test_a_run_waits_for_its_cores_and_a_killed_holder_frees_them(tmp_path, monkeypatch):
    """Two cores: a holder of both makes a one-core run wait (and say so); all or nothing, so a
    run asking two never holds one while waiting; SIGKILL of the holder frees the cores."""
    ctx = multiprocessing.get_context("fork")
    pool, cores = str(tmp_path / "pool"), [0, 1]
    out = ctx.Queue()
    a_started, a_release = ctx.Event(), ctx.Event()
    a = ctx.Process(target=_hold, args=(2, cores, pool, a_started, a_release, out))
    a.start()
    assert a_started.wait(20)
    assert out.get(timeout=5)[0] == "held"
    b_started, b_release = ctx.Event(), ctx.Event()
    b = ctx.Process(target=_hold, args=(1, cores, pool, b_started, b_release, out))
    b.start()
    kind, text = out.get(timeout=10)
    assert kind == "said" and text == "waiting for 1 free core(s) of 2: 2 busy with other runs"
    assert not b_started.wait(1.5)  # still waiting
    os.kill(a.pid, signal.SIGKILL)  # the kernel drops a dead holder's locks
    a.join(10)
    assert b_started.wait(10)
    kind, waited = out.get(timeout=5)
    assert kind == "held" and waited >= 1.5
    # b holds one core: a two-core run waits, a one-core run does not
    monkeypatch.setenv("ABLATION_CORES_DIR", pool)
    try:
        with CoreHold(1, say=pytest.fail, cores=cores) as h:
            assert h.waited_s < 1.0
        b_release.set()  # b lets go: a two-core run gets both within a poll or two
        with CoreHold(2, say=lambda t: None, cores=cores) as h:
            assert len(h.fds) == 2 and h.waited_s < 5
    finally:
        b.join(10)


def test_an_interrupt_inside_a_step_that_must_finish_is_raised_at_its_end():
    """core.deferred: SIGTERM inside the block is noted, the block runs to its end, then it is
    raised as Interrupted, the handlers left as after a first signal (SIGTERM ignored)."""
    from ablation.core.cli import Interrupted
    from ablation.core.deferred import deferred_interrupts
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    done = []
    try:
        with pytest.raises(Interrupted) as e:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run by now, and raised nothing
                done.append("end of the step")
        assert done == ["end of the step"] and e.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        with deferred_interrupts():  # nothing noted: nothing raised
            done.append("quiet")
        assert done[-1] == "quiet"
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_the_svm_stage_waits_while_a_run_holds_the_cores(defaults, tmp_path, monkeypatch):
    """An svm fit computes with torch's threads, so it holds cores like a train run: while
    another run holds them all it waits (and says so), writing nothing; freed, it fits."""
    data = str(tmp_path / "d.npz")
    save_prepared(data, synthetic_arrays(n_train=200, n_test=50), SYNTH_CLASSES)
    p = {k: dict(v) for k, v in defaults.items()}
    p["svm"].update(train_samples=100, backend="libsvm")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p))
    pool, out = str(tmp_path / "pool"), tmp_path / "svm.out"
    cmd = [sys.executable, "-m", "ablation.stages.svm", "--data", data, "--kernel", "rbf",
           "--metrics", str(tmp_path / "s.json"), "--out", str(tmp_path / "s.npz"),
           "--params", str(tmp_path / "p.yaml")]
    monkeypatch.setenv("ABLATION_CORES_DIR", pool)
    with CoreHold(len(machine_cores()), say=pytest.fail):
        with open(out, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for_text(out, "waiting for", proc, timeout=60)
            time.sleep(1.0)
            assert proc.poll() is None and not (tmp_path / "s.json").exists()
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(120) == 0, out.read_text()[-2000:]
    assert 0 <= json.loads((tmp_path / "s.json").read_text())["test_accuracy"] <= 100


def stage(data, tmp_path, params, name="m", env=None):
    """The train stage as dvc.yaml runs it, as a process of its own (output to files)."""
    path = tmp_path / f"{name}.params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    cmd = [sys.executable, "-m", "ablation.stages.train", "--data", data, "--model", "resnet18",
           "--metrics", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / f"{name}.pt"),
           "--ckpt", str(tmp_path / f"{name}.ckpt"), "--params", str(path)]
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def longer(tmp_path_factory):
    """A synthetic dataset whose epochs last a few seconds (1,600 images)."""
    path = str(tmp_path_factory.mktemp("longer") / "longer.npz")
    save_prepared(path, synthetic_arrays(n_train=1600, n_test=200), SYNTH_CLASSES)
    return path


def shrunk(defaults, **train):
    p = {k: dict(v) for k, v in defaults.items()}
    p["data"].update(datasets=["mnist"], train_limit=None, test_limit=None)
    p["train"].update({"epochs": 3, "device": "cpu", "threads": 1, **train})
    return p


def wait_for_text(path, text, proc, timeout=120):
    t0 = time.time()
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text()[-2000:]
        assert time.time() - t0 < timeout, f"no {text!r} in {timeout} s"
        time.sleep(0.1)


def last_line(path):
    lines = [ln for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines()
             if ln.strip()]
    return lines[-1] if lines else ""


def test_threads_above_the_cores_is_one_clear_error(synthetic, tmp_path, defaults):
    n = len(machine_cores())
    p = stage(synthetic, tmp_path, shrunk(defaults, threads=n + 1))
    assert p.wait(60) == 2
    assert last_line(tmp_path / "m.err") == (
        f"error: params.yaml: train.threads = {n + 1}: runs here may use {n} "
        f"core(s) (allowed here: auto, 1..{n})")
    assert not list(tmp_path.glob("m.json")) and not list(tmp_path.glob("m.pt"))


@pytest.mark.slow
def test_train_stage_interrupts_keep_finished_epochs_and_resume_to_the_same_numbers(
        longer, tmp_path, defaults):
    """SIGINT in epoch 1 keeps nothing; SIGTERM in epoch 2 keeps epoch 1, and the same command
    resumes from it to the metrics of an uninterrupted run; SIGTERM while waiting for cores
    writes nothing. Each: one line, 130 or 143, no traceback, no output file."""
    p = shrunk(defaults)
    whole = stage(longer, tmp_path, p, "whole")
    assert whole.wait(300) == 0, (tmp_path / "whole.err").read_text()[-2000:]
    expect = json.loads((tmp_path / "whole.json").read_text())

    run = stage(longer, tmp_path, p)
    wait_for_text(tmp_path / "m.out", "resnet18: training epochs 1-3 on", run)
    run.send_signal(signal.SIGINT)
    assert run.wait(60) == 130
    assert last_line(tmp_path / "m.err") == ("interrupted by SIGINT: resnet18 stopped in epoch "
                                             "1 of 3; no finished epoch kept: the same "
                                             "command starts afresh")
    assert "Traceback" not in (tmp_path / "m.err").read_text()
    assert not any((tmp_path / f"m.{ext}").exists() for ext in ("json", "pt", "ckpt"))

    run = stage(longer, tmp_path, p)
    wait_for_text(tmp_path / "m.out", "epoch 1/3: loss", run)
    t0 = time.time()
    while not (tmp_path / "m.ckpt").exists():  # epoch 1 checkpointed
        assert time.time() - t0 < 30
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 143
    err = (tmp_path / "m.err").read_text()
    assert last_line(tmp_path / "m.err").startswith("interrupted by SIGTERM: resnet18 stopped in "
                                                    "epoch 2 of 3; 1 finished epoch(s) "
                                                    "checkpointed"), err[-500:]
    assert "Traceback" not in err and not (tmp_path / "m.json").exists()
    store = os.path.join(os.environ["ABLATION_CACHE_DIR"], "checkpoints")
    kept = os.listdir(store)
    assert len(kept) == 1 and (tmp_path / "m.ckpt").exists()
    (tmp_path / "m.ckpt").unlink()  # as in a fresh workspace: the machine's store resumes it

    # a run holding every core: the resumed run waits; SIGTERM while it waits writes nothing
    pool = {"ABLATION_CORES_DIR": str(tmp_path / "pool")}
    hog = stage(longer, tmp_path, shrunk(defaults, threads=len(machine_cores()), epochs=50),
                "hog", pool)
    wait_for_text(tmp_path / "hog.out", "training epochs 1-50", hog)
    waiting = stage(longer, tmp_path, p, "w", pool)
    wait_for_text(tmp_path / "w.out", "waiting for 1 free core(s)", waiting)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(60) == 143 and last_line(tmp_path / "w.err") == "interrupted by SIGTERM"
    assert not (tmp_path / "w.json").exists() and os.listdir(store) == kept
    hog.send_signal(signal.SIGINT)
    assert hog.wait(60) == 130

    again = stage(longer, tmp_path, p)
    assert again.wait(300) == 0, (tmp_path / "m.err").read_text()[-2000:]
    assert "after epoch 1" in (tmp_path / "m.out").read_text()
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["epochs_completed"] == 3 and same_numbers(got, expect), (got, expect)
    assert os.listdir(store) == []  # a finished run removes its copy


# ---- one result per params: dvc repro, DVC's queue with one and two workers, Ray ------------

GRID = """name: same
targets: [train]
columns:
  - {label: acc %, metric: test_accuracy, fmt: .2f}
rows:
  - {id: a}
  - {id: b}
"""


def scratch(tmp_path, base, name):
    """A copy of the session's shrunk base (conftest.shrunk_base) with 320 MNIST images, 200
    test images, one epoch, one thread, a DVC remote of its own, committed: its run cache holds
    no run of these params, so every run computes."""
    repo, _ = copy_base(base, tmp_path / name)
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])

    def sh(*cmd, ok=True):
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert not ok or r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout + r.stderr

    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"].update(datasets=["mnist"], train_limit=320, test_limit=200)
    p["train"].update(epochs=1, device="cpu", threads=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (repo / "grids" / "same.yaml").write_text(GRID)
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "shrunk")
    return repo, env, sh


def exp_metrics(sh, name):
    """The metrics file experiment `name` committed."""
    rev = D.newest(json.loads(sh("dvc", "exp", "show", "--json")))[name].rev
    return json.loads(sh("git", "show", f"{rev}:metrics/resnet/mnist/resnet18.json"))


@pytest.mark.slow
def test_one_result_per_params_whoever_runs_it(shrunk_base, tmp_path):
    """The same params and seed give the same numbers under `dvc repro`, `grid queue` with one
    worker and with two side by side (one thread each: never more threads than cores), and
    `grid run` on Ray; each run records its thread count."""
    from .test_grid_report import _wait_queue, start_queue
    repo, env, sh = scratch(tmp_path, shrunk_base, "repro")
    out = sh("dvc", "repro", "train")
    assert "Running stage 'train@mnist-resnet18'" in out
    base = json.loads((repo / "metrics" / "resnet" / "mnist" / "resnet18.json").read_text())
    record = json.loads((repo / "metrics" / "resnet" / "mnist" / "resnet18.run.json").read_text())
    assert record["threads"] == 1 and base["test_images"] == 200

    results = {}
    for jobs in (1, 2):  # a clone each: no run cache shared, every run computes
        repo, env, sh = scratch(tmp_path, shrunk_base, f"queue{jobs}")
        rows = ["a"] if jobs == 1 else ["a", "b"]
        q = sh(sys.executable, "-m", "ablation.grid", "queue", "grids/same.yaml", "--rows", *rows)
        assert q.count("dvc exp run --queue") == len(rows)
        sh("dvc", "repro", "prepare")
        start_queue(repo, env, jobs)
        status = _wait_queue(repo, env)
        assert status.count("Success") == len(rows), status
        for r in rows:
            results[f"queue -j {jobs}: {r}"] = exp_metrics(sh, f"same-{r}")
    repo, env, sh = scratch(tmp_path, shrunk_base, "ray")
    out = sh(sys.executable, "-m", "ablation.grid", "run", "grids/same.yaml", "--rows", "a")
    assert "1 run(s) succeeded, 0 failed" in out, out
    assert "same-a train@mnist-resnet18 epoch 1/1: test" in out, out  # progress from the task
    results["ray"] = exp_metrics(sh, "same-a")
    for how, m in results.items():
        assert same_numbers(m, base), (how, m, base)


def train_pids(repo):
    """The train stages running in `repo` or in its DVC queue's temporary workspaces: the Python
    processes, not a shell that runs one (DVC runs a stage's command through $SHELL, which may
    fork rather than exec it) nor DataLoader workers (forked children with the same command)."""
    r = subprocess.run(["pgrep", "-f", "ablation.stages.train"], capture_output=True, text=True)
    found = {}
    for pid in map(int, r.stdout.split()):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(repo)):
                with open(f"/proc/{pid}/cmdline", "rb") as f:  # comm is torch's thread name
                    argv0 = os.path.basename(f.read().split(b"\0")[0])
                with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ..."
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if argv0.startswith(b"python"):
                    found[pid] = ppid
        except (OSError, ValueError, IndexError):
            pass
    return [pid for pid, ppid in found.items() if ppid not in found]


@pytest.mark.slow
def test_queue_interrupts_and_a_preempted_worker_resume_from_the_epoch(shrunk_base, tmp_path):
    """Ctrl-C on `grid queue` while it queues: one line, 130, the `dvc exp run --queue` under
    way finished (workspace clean, no stash), what was queued stays queued and the same
    command queues the rest. SIGTERM to a queue worker's train stage (a preempted job)
    in epoch 2: the experiment fails; `grid queue` again re-queues it, the new run resumes from
    epoch 1 (the machine's checkpoint store: the worker's workspace is gone) and ends with the
    numbers of an uninterrupted run."""
    from .test_grid_report import _wait_queue, start_queue
    repo, env, sh = scratch(tmp_path, shrunk_base, "q")
    env["ABLATION_CACHE_DIR"] = str(tmp_path / "cache")
    (repo / "grids" / "long.yaml").write_text(
        "name: long\ntargets: [train]\nset: {data.train_limit: 1600, train.epochs: 3}\n"
        "rows:\n  - {id: a}\n  - {id: b, set: {train.lr: 0.002}}\n  - {id: c, set: {train.lr: "
        "0.0005}}\n")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "long grid")
    grid = [sys.executable, "-m", "ablation.grid", "queue", "grids/long.yaml"]
    q = subprocess.Popen(grid, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    first = ""
    while "dvc exp run --queue" not in first:
        first = q.stdout.readline()
        assert first or q.poll() is None, q.stderr.read()
    os.killpg(q.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    out, err = q.communicate(timeout=60)
    assert q.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted by SIGINT" and "Traceback" not in err
    # the `dvc exp run --queue` under way finished: no params.yaml left changed, no stash
    assert sh("git", "status", "--porcelain", "--untracked-files=no") == ""
    assert sh("git", "stash", "list") == ""
    again = sh(*grid, "--rows", "a", "b")
    # a was queued before the interrupt: only b is queued now
    assert "skip long-a: already queued" in again and "queued 1 experiment(s)" in again, again
    assert "Traceback" not in again
    status = sh("dvc", "queue", "status")
    assert status.count("Queued") == 2, status  # a and b once each: nothing queued twice
    sh("dvc", "queue", "remove", "--queued")  # only a runs below
    sh(*grid, "--rows", "a")

    sh("dvc", "repro", "prepare")
    start_queue(repo, env, 1)
    store = tmp_path / "cache" / "checkpoints"
    t0 = time.time()
    while not (store.exists() and list(store.glob("*.ckpt"))):  # epoch 1 checkpointed
        assert time.time() - t0 < 300, sh("dvc", "queue", "status")
        time.sleep(0.2)
    pids = train_pids(repo)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGTERM)
    status = _wait_queue(repo, env)
    assert "Failed" in status, status
    log = sh("dvc", "queue", "logs", "long-a", ok=False)
    assert "interrupted by SIGTERM: resnet18 stopped in epoch 2 of 3; 1 finished epoch(s) " \
           "checkpointed" in log, log[-3000:]
    assert sh(*grid, "--rows", "a").count("dvc exp run --queue") == 1
    start_queue(repo, env, 1)
    status = _wait_queue(repo, env)
    assert status.count("Success") == 1, status
    assert "after epoch 1" in sh("dvc", "queue", "logs", "long-a", ok=False)
    assert list(store.iterdir()) == []
    resumed = exp_metrics(sh, "long-a")

    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"]["train_limit"], p["train"]["epochs"] = 1600, 3
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(p))
    sh(sys.executable, "-m", "ablation.stages.train", "--data", "data/prepared/mnist.npz",
       "--model", "resnet18", "--metrics", str(tmp_path / "whole.json"),
       "--out", str(tmp_path / "whole.pt"), "--params", str(tmp_path / "whole.yaml"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert resumed["epochs_completed"] == 3 and same_numbers(resumed, whole), (resumed, whole)
