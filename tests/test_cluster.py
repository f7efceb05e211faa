"""`grid run` on a real two-node Ray cluster on this machine (logical GPUs: Ray sets
CUDA_VISIBLE_DEVICES on a CPU machine too), with the repository as the git remote and a local
directory as the DVC remote. Every process the test starts is ended by its process group."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from ablation.core import cli
from ablation.grid import command
from ablation.record import dvc as D

from .helpers import copy_base
from .sshd import free_port, sshd

if os.environ.get("CI") == "true":
    import ray  # noqa: F401  a pinned dependency: missing under CI is a failure, not a skip
else:
    pytest.importorskip("ray")
BIN = os.path.dirname(sys.executable)
GRID = """name: rg
targets: [train]
set: {data.datasets: [mnist], data.train_limit: 200, data.test_limit: 500, train.epochs: 1,
      train.threads: 1, train.device: auto}
columns:
  - {label: lr, param: train.lr}
  - {label: acc %, metric: test_accuracy, fmt: .2f}
extra:
  - {label: loss, metric: final_train_loss, fmt: .6f}
  - {label: GPUs seen, metric: cuda_visible_devices}
rows:
  - {id: a, set: {train.lr: 0.001, data.train_limit: 640}}
  - {id: b, set: {train.lr: 0.002}}
  - {id: c, set: {train.lr: 0.0005}}
  - {id: d, set: {train.lr: 0.0015}}
  - {id: f, set: {train.lr: 0.003}}
  - {id: e, set: {train.device: cuda}}  # last: Ray hands out the queued runs in this order
"""
OK_RUNS = ("rg-a", "rg-b", "rg-c", "rg-d", "rg-f")
PACKED = """name: rp
targets: [train]
set: {data.datasets: [mnist], train.device: cpu}
columns:
  - {label: lr, param: train.lr}
rows:  # none the base's own setting: DVC would restore that run, record and all, from its cache
  - {id: a, set: {train.lr: 0.002}}
  - {id: b, set: {train.lr: 0.0005}}
  - {id: c, set: {train.lr: 0.0015}}
"""


def test_driver_refuses_uncommitted_or_unpushed_code(tmp_path, monkeypatch):
    from ablation.core.cli import UserError
    from ablation.grid import clone as cluster
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    repo, other = tmp_path / "repo", tmp_path / "other.git"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("1")
    subprocess.run(git + ["add", "f"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "one"], cwd=repo, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(other)], check=True)
    monkeypatch.chdir(repo)
    assert cluster.check_commit(str(repo)) == cluster.git("rev-parse", "HEAD")
    assert cluster.check_commit(str(other))  # pushed
    (repo / "reports").mkdir()  # a forecast `grid queue` saved: no run reads it
    (repo / "reports" / "g.forecast.json").write_text("{}")
    subprocess.run(git + ["add", "reports"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "forecast"], cwd=repo, check=True)
    (repo / "reports" / "g.forecast.json").write_text('{"runs": {}}')
    assert cluster.check_commit(str(repo)) == cluster.git("rev-parse", "HEAD")
    (repo / "f").write_text("2")
    with pytest.raises(UserError, match=r"uncommitted changes \(f\): grid run runs a commit"):
        cluster.check_commit(str(repo))
    subprocess.run(git + ["add", "f"], cwd=repo, check=True)  # staged is not committed either
    with pytest.raises(UserError, match="uncommitted changes"):
        cluster.check_commit(str(repo))
    subprocess.run(git + ["commit", "-qam", "two"], cwd=repo, check=True)
    with pytest.raises(UserError, match=r"HEAD [0-9a-f]{8} is not pushed to .*other.git"):
        cluster.check_commit(str(other))


def test_packing_env_only_where_runs_share_a_gpu():
    from ablation.grid import ray as cluster
    assert cluster.packing_env(0.25) == {"ABLATION_PACKING": "ray-fractional",
                                         "ABLATION_GPU_SHARED_BY": "4"}
    assert [cluster.runs_per_gpu(x) for x in (0.5, 1 / 3, 0.3, 0.0001)] == [2, 3, 3, 10000]
    assert cluster.packing_env(0) == cluster.packing_env(1) == cluster.packing_env(2) == {}


@pytest.mark.parametrize("flag,value", [("--gpus-per-run", "1.5"), ("--gpus-per-run", "0.6"),
                                        ("--gpus-per-run", "-1"), ("--gpus-per-run", "nan"),
                                        ("--gpus-per-run", "0.00001"), ("--cpus-per-run", "0")])
def test_grid_run_refuses_bad_resources_in_one_line(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        cli.run(command.main, ["run", "no-such-grid.yaml", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag} ")
    assert "allowed:" in err


@pytest.mark.parametrize("value", ["0", "0.5", "0.25", "1", "2"])
def test_grid_run_takes_whole_gpus_or_a_shared_fraction(capsys, value):
    with pytest.raises(SystemExit):  # past the flags, on to the (missing) grid file
        cli.run(command.main, ["show", "no-such-grid.yaml", "--gpus-per-run", value])
    assert "no-such-grid.yaml: file not found" in capsys.readouterr().err



# Token authentication on, as the README's recipe sets it: every node and client of the test
# cluster reads the one token `ray get-auth-token --generate` wrote (ray_token, below)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module", autouse=True)
def ray_token(tmp_path_factory):
    """The README's first step on the head machine: `ray get-auth-token --generate` (here into a
    HOME of the test's own, never the user's ~/.ray)."""
    home = tmp_path_factory.mktemp("ray-home")
    r = subprocess.run([os.path.join(BIN, "ray"), "get-auth-token", "--generate"],
                       env=dict(os.environ, HOME=str(home)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    path = home / ".ray" / "auth_token"
    RAY_ENV["RAY_AUTH_TOKEN_PATH"] = str(path)
    yield path.read_text().strip()
    RAY_ENV.pop("RAY_AUTH_TOKEN_PATH", None)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The team's server: a real sshd (tests/sshd.py), and `machine(name)`: the environment of
    a machine of its own (HOME and TMPDIR of its own, an SSH client config that reaches the
    server with the team key, git told to use it): what each node, and the driver, run in.
    One for the module, as the cluster below."""
    root = tmp_path_factory.mktemp("team")
    with sshd(str(root)) as server:
        def machine(name):
            home = root / f"machine-{name}"
            if (home / "bin" / "ssh").exists():
                return machine_env(home)
            (home / ".ssh").mkdir(parents=True)
            (home / "tmp").mkdir()
            cfg = home / ".ssh" / "config"
            cfg.write_text(f"Host {server['host']}\n  Port {server['port']}\n  User "
                           f"{server['user']}\n  IdentityFile {server['key']}\n"
                           "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
            # ssh reads the passwd entry's home, not HOME: an `ssh` first on PATH passes the
            # machine's config (git and DVC's git client both run `ssh`)
            (home / "bin").mkdir()
            wrapper = home / "bin" / "ssh"
            wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {cfg} "$@"\n')
            wrapper.chmod(0o755)
            return machine_env(home)
        yield server, machine, root


def machine_env(home):
    return {"HOME": str(home), "TMPDIR": str(home / "tmp"), "GIT_SSH": str(home / "bin" / "ssh"),
            "PATH": os.pathsep.join([str(home / "bin"), BIN, os.environ["PATH"]])}


NODE_CACHE = {}  # cluster address: the ABLATION_CACHE_DIR its nodes' runs use


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_token, team):
    """A head node (2 CPUs, 2 logical GPUs) and a second node (1 CPU, 1 GPU), each a
    `ray start --block` in its own process group, ended by that group, also when start-up
    fails; token auth on: the head reads the token file, the second node (as on another
    machine) gets the token in RAY_AUTH_TOKEN, as the README says. A client without the token
    is refused. One cluster for the module's tests (starting and stopping one takes 45 s);
    its nodes' runs keep checkpoints in a store of the module's own (`store`, below)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix socket paths must stay short
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], **RAY_ENV,
               ABLATION_CACHE_DIR=str(tmp_path / "cache"))
    NODE_CACHE[f"127.0.0.1:{port}"] = tmp_path / "cache"
    other = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    procs = []

    def start(*args, env=env):
        log = open(tmp_path / f"ray{len(procs)}.log", "w")
        procs.append(subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", *args],
                                      env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        start("--head", f"--port={port}", "--num-cpus=2", "--num-gpus=2", f"--temp-dir={tmp}",
              "--include-dashboard=false", "--disable-usage-stats",
              env=dict(env, **team[1]("head")))
        address = f"127.0.0.1:{port}"
        wait_for(lambda: subprocess.run(
            [os.path.join(BIN, "ray"), "status", f"--address={address}"], env=env,
            capture_output=True).returncode == 0, 90, "head")
        start(f"--address={address}", "--num-cpus=1", "--num-gpus=1",
              env=dict(other, RAY_AUTH_TOKEN=ray_token, **team[1]("worker")))
        wait_for(lambda: nodes(address, env).count(" node_") >= 2, 90, "second node")
        refused = subprocess.run(  # no token: Ray's own error, not a cluster status
            [os.path.join(BIN, "ray"), "status", f"--address={address}"], capture_output=True,
            text=True, env=dict(other, HOME=str(tmp_path), RAY_AUTH_MODE="disabled"))
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stderr
        yield address
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever of the group is still there (raylet, gcs_server, workers)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def nodes(address, env):
    r = subprocess.run([os.path.join(BIN, "ray"), "status", f"--address={address}"], env=env,
                       capture_output=True, text=True)
    return r.stdout


def wait_for(cond, timeout, what):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"{what} not up in {timeout} s"
        time.sleep(1)


def children_running(pattern):
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def running(prefix):
    """The runs named `prefix...` whose `dvc exp run` is running now."""
    r = subprocess.run(["pgrep", "-af", f"exp run --pull -n {prefix}"], capture_output=True,
                       text=True)
    return frozenset(re.findall(rf"-n ({prefix}\S+)", r.stdout))


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class Clone(NamedTuple):
    repo: Path
    storage: Path  # its DVC remote, a local directory
    env: dict
    sh: Callable  # sh(*cmd, cwd=repo, ok=True): a command's stdout + stderr, asserted to succeed


def clone(tmp_path, base, name, grid):
    """A copy of the session's shrunk base (conftest.shrunk_base: a clone of this repository
    shrunk to one dataset and one epoch, its outputs pushed to a local DVC remote, as `make
    run` leaves them) with its own remote, grids/NAME.yaml `grid` committed."""
    repo, storage = copy_base(base, tmp_path)
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], **RAY_ENV)

    def sh(*cmd, cwd=repo, ok=True):
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert not ok or r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout + r.stderr

    (repo / "grids" / f"{name}.yaml").write_text(grid)
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"grid {name}")
    return Clone(repo, storage, env, sh)


def records(sh, repo, names):
    """Each run's metrics with its record (where it ran, how it shared its GPU), as the report
    reads them from `dvc exp show`."""
    runs = D.attach_records(D.newest(json.loads(sh("dvc", "exp", "show", "--json"))), cwd=repo)
    return {n: runs[n].metrics["metrics/resnet/mnist/resnet18.json"] for n in names}


@pytest.mark.slow
def test_grid_run_on_a_two_node_cluster(store, cluster, team, shrunk_base, tmp_path):
    """Shared nothing: each node (and the driver) has a HOME, TMPDIR and DVC cache of its own
    and reaches the code and the results only through the team's server over SSH: the git
    remote (a bare repository) and the DVC remote. Each run comes back as a DVC experiment."""
    repo, storage, env, sh = clone(tmp_path, shrunk_base, "rg", GRID)
    server, machine, _ = team
    origin = tmp_path / "origin.git"
    env.update(machine("driver"))
    ssh = f"ssh://{server['host']}:{server['port']}"
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    sh("git", "push", "-q", f"{ssh}{origin}", "HEAD:refs/heads/main")
    sh("dvc", "remote", "modify", "--local", "storage", "url", f"{ssh}{storage}")
    run = [sys.executable, "-m", "ablation.grid", "run", "grids/rg.yaml", "--address", cluster,
           "--git-remote", f"{ssh}{origin}", "--dvc-remote", f"{ssh}{storage}"]

    # the first driver: one worker SIGKILLed mid-run (Ray retries it), then the driver itself
    log1 = tmp_path / "driver1.log"
    with open(log1, "w") as out:
        d1 = subprocess.Popen(run, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: children_running("exp run --pull -n rg-a"), 120, "run a")
    worker = parent(children_running("exp run --pull -n rg-a")[0])
    os.kill(worker, signal.SIGKILL)
    # Ray's notice of the retry, and a run finished (not merely done: rg-e fails at once)
    wait_for(lambda: re.search(r"will be retried[\s\S]*rg-\w: SUCCESS", log1.read_text())
             or d1.poll() is not None, 300, "the retry of run a, then a finished run")
    if d1.poll() is None:
        d1.send_signal(signal.SIGKILL)
        d1.wait()
    first = log1.read_text()
    assert "will be retried" in first  # Ray saw the worker die and ran the task again

    # the second driver runs only what is missing. Both nodes ran runs on record: on an idle
    # cluster Ray's first three leases take the first three queued runs (FIFO), one on each
    # slot (head 2, worker 1: SPREAD picks an available node while there is one), and all
    # three succeed where none of them is e. So at least three runs but e must be left to this
    # driver: the first ran a, b and c at once and was killed within a second of its first
    # SUCCESS, and a's retry started from scratch after a was killed, so it finished b and c at
    # most. (With a and d left, e may take the worker's slot: a CI run once recorded every run
    # on the head.)
    finished_first = [n for n in OK_RUNS if f"{n}: SUCCESS" in first]
    assert len(OK_RUNS) - len(finished_first) >= 3, first[-3000:]
    wait_for(lambda: re.search(r"\b0\.0/3\.0 GPU", nodes(cluster, env)), 60,
             "the killed driver's runs' GPUs back")  # Ray ends a dead driver's tasks
    out2 = sh(*run)
    for n in finished_first:
        assert f"skip {n}: already success" in out2
    assert "rg-e: FAILED" in out2 and "no cuda device" in out2  # a stage error: not retried
    # what the killed driver's runs had checkpointed, the second one's runs resumed and removed
    assert not list(store.glob("*.ckpt")), sorted(store.iterdir())

    names = sh("dvc", "exp", "list", "--name-only").split()
    assert sorted(n for n in names if n.startswith("rg-")) == list(OK_RUNS), \
        first[-3000:] + out2[-3000:]
    metrics = records(sh, repo, OK_RUNS)
    assert len({m["final_train_loss"] for m in metrics.values()}) == len(OK_RUNS)  # its own
    assert metrics["rg-a"]["train_images"] == 640
    assert len({m["cuda_visible_devices"] for m in metrics.values()}) >= 2
    assert len({m["ray_node_id"] for m in metrics.values()}) == 2  # both nodes ran runs
    assert {m["packing"] for m in metrics.values()} == {"solo"}  # a whole GPU each
    sh(sys.executable, "-m", "ablation.report", "grids/rg.yaml")
    md = (repo / "reports" / "rg.md").read_text()
    assert "| e | needs a GPU (FAILED (1/1))" in md and "no cuda device" in md  # tried here
    assert md.count(", node ") == len(OK_RUNS) and "Where the runs ran" in md  # each run's place
    sh("git", "config", "user.name", "t")  # the driver's own HOME has no git identity
    sh("git", "config", "user.email", "t@t")
    sh("dvc", "exp", "apply", "rg-b")  # its model, from the DVC remote over SSH alone:
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "models/mnist/resnet18.pt").unlink()
    assert "1 file added" in sh("dvc", "pull", "models/mnist/resnet18.pt")
    assert (repo / "models/mnist/resnet18.pt").stat().st_size > 1_000_000

    # a fresh clone gets an experiment with its model
    fresh = tmp_path / "fresh"
    sh("git", "clone", "-q", str(repo), str(fresh), cwd=tmp_path)
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(storage), cwd=fresh)
    sh("dvc", "exp", "pull", "origin", "rg-b", cwd=fresh)
    sh("dvc", "exp", "apply", "rg-b", cwd=fresh)
    sh("dvc", "pull", "train", cwd=fresh)
    import torch
    art = torch.load(fresh / "models" / "mnist" / "resnet18.pt", weights_only=True)
    assert art["metrics"]["final_train_loss"] == metrics["rg-b"]["final_train_loss"]


@pytest.mark.slow
def test_grid_run_packs_two_runs_on_a_gpu(cluster, shrunk_base, tmp_path):
    """--gpus-per-run 0.5: every run records that two runs share its GPU, and runs that ran at
    the same time on one node were given one GPU (Ray packs one GPU before the next)."""
    c = clone(tmp_path, shrunk_base, "rp", PACKED)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        d = subprocess.Popen([sys.executable, "-m", "ablation.grid", "run", "grids/rp.yaml",
                              "--address", cluster, "--dvc-remote", str(c.storage),
                              "--gpus-per-run", "0.5"],
                             cwd=c.repo, env=c.env, stdout=out, stderr=subprocess.STDOUT)
    together, t0 = set(), time.time()  # the sets of runs seen running at one moment
    try:
        while d.poll() is None:
            assert time.time() - t0 < 600, "grid run not done in 600 s"
            together.add(running("rp-"))
            time.sleep(0.5)
    finally:
        d.kill()
    out = log.read_text()
    assert d.returncode == 0 and "0.5 GPU(s) per run (2 runs share each GPU)" in out, out[-3000:]
    rec = records(c.sh, c.repo, ("rp-a", "rp-b", "rp-c"))
    assert {(r["packing"], r["gpu_shared_by"]) for r in rec.values()} == {("ray-fractional", 2)}
    assert {r["cuda_visible_devices"] for r in rec.values()} <= {"0", "1"}  # one id each
    pairs = {(a, b) for s in together for a in s for b in s
             if a < b and rec[a]["ray_node_id"] == rec[b]["ray_node_id"]}
    assert pairs, together  # the head (2 CPUs, one per run) ran two at once
    for a, b in pairs:
        assert rec[a]["cuda_visible_devices"] == rec[b]["cuda_visible_devices"], (a, b, rec)


INTERRUPTED = """name: pi
targets: [train]
set: {data.datasets: [mnist], data.train_limit: 640, data.test_limit: 200, train.epochs: 4,
      train.threads: 1, train.device: cpu}
columns:
  - {label: lr, param: train.lr}
rows:
  - {id: a, set: {train.lr: 0.002}}
  - {id: b, set: {train.lr: 0.0005}}
"""
# [3/8 epochs, ETA 0.4 min] pi-a train@mnist-resnet18 epoch 2/4: test 71.50%, 350 img/s
EPOCH_LINE = re.compile(r"^\[(\d+)/(\d+) epochs, ETA [\d.]+ min\] (\S+) (\S+) epoch (\d+)/(\d+): "
                        r"test ([\d.]+)%, (\d+) img/s$", re.M)
# what differs between two runs of the same params: how long things took, and where they ran
TIMING = {"train_time_ms", "images_per_s", "data_wait_ms", "eval_time_ms", "peak_memory_mb",
          "cores_wait_s", "other_load_cores", "timed_end"}  # when, how fast, beside what
PLACEMENT = {"ray_node_id", "cuda_visible_devices"}


def epoch_lines(out):
    """(count, total, name, stage, epoch, epochs, accuracy %, img/s) of each epoch line."""
    return [(int(c), int(t), n, s, int(e), int(es), float(a), int(ips))
            for c, t, n, s, e, es, a, ips in EPOCH_LINE.findall(out)]


@pytest.fixture
def store(cluster):
    """The checkpoint store (ABLATION_CACHE_DIR/checkpoints) of the cluster's nodes."""
    return NODE_CACHE[cluster] / "checkpoints"


def leftovers(root):
    """Run clones and driver workdirs in the driver's and the nodes' TMPDIRs."""
    return {p for m in ("driver", "head", "worker") if (root / f"machine-{m}" / "tmp").exists()
            for p in (root / f"machine-{m}" / "tmp").iterdir()
            if p.name.startswith(("ablation-grid-", "pi-"))}


def interrupt(c, cluster, team, tmp_path, sig, when):
    """`grid run grids/pi.yaml` in a process group of its own on a machine of its own (TMPDIR),
    `sig` to the driver alone once its stdout has a line matching `when`; returns (exit status,
    stdout, stderr). Then nothing of the runs is left: no `dvc exp run` or train stage process,
    no new clone in the driver's TMPDIR or any node's."""
    env = dict(c.env, **team[1]("driver"))
    before = leftovers(team[2])
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"
    with open(out, "w") as o, open(err, "w") as e:
        d = subprocess.Popen([sys.executable, "-m", "ablation.grid", "run", "grids/pi.yaml",
                              "--address", cluster, "--dvc-remote", str(c.storage)],
                             cwd=c.repo, env=env, stdout=o, stderr=e, start_new_session=True)
    try:
        wait_for(lambda: re.search(when, out.read_text(), re.M) or d.poll() is not None, 240,
                 f"a line {when!r}")
        assert d.poll() is None, (out.read_text(), err.read_text()[-3000:])
        os.kill(d.pid, sig)
        d.wait(timeout=120)
    finally:
        if d.poll() is None:
            os.killpg(d.pid, signal.SIGKILL)
            d.wait()
    ours = [p for p in children_running("ablation.stages.train") if alive(p)
            and os.readlink(f"/proc/{p}/cwd").startswith(str(team[2]))]
    assert not running("pi-") and not ours, (running("pi-"), ours)
    left = leftovers(team[2]) - before
    assert not left, left
    return d.returncode, out.read_text(), err.read_text()


def alive(pid):
    """Whether process `pid` still runs: a zombie has stopped (its parent, here PID 1, may
    never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def one_interrupt_line(err, signame):
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith(f"interrupted by {signame}") and "Traceback" not in err, err[-3000:]
    return last


@pytest.mark.slow
def test_grid_run_interrupted_resumes_to_the_same_numbers(store, cluster, team, shrunk_base,
                                                         tmp_path):
    """SIGINT to the driver after an epoch: exit 130 with one line, the runs stopped and their
    clones removed, their finished epochs in the machine's checkpoint store. The same command
    resumes them from there (empty store at the end), to the numbers of a run never stopped;
    --quiet prints no epoch lines."""
    c = clone(tmp_path, shrunk_base, "pi", INTERRUPTED)
    run = [sys.executable, "-m", "ablation.grid", "run", "grids/pi.yaml", "--address", cluster,
           "--dvc-remote", str(c.storage)]
    rc, out, err = interrupt(c, cluster, team, tmp_path, signal.SIGINT, r" epoch 1/4: test ")
    assert rc == 130, (rc, out, err[-3000:])
    assert "cancelled: their finished epochs are kept" in one_interrupt_line(err, "SIGINT")
    import torch
    kept = [torch.load(p, weights_only=True) for p in store.glob("*.ckpt")]
    stopped = {n for _, _, n, *_ in epoch_lines(out)} - set(re.findall(r"\] (pi-\w): SUCC", out))
    assert stopped and len(kept) >= len(stopped), (out, sorted(store.glob("*")))
    assert all(not k["complete"] and 1 <= k["epoch"] == len(k["history"]) < 4 for k in kept)

    again = c.sh(*run)
    assert again.rstrip().endswith("2 run(s) succeeded, 0 failed"), again
    first = {n: min(e for _, _, m, _, e, *_ in epoch_lines(again) if m == n) for n in stopped}
    assert all(e > 1 for e in first.values()), (first, again)  # from its checkpoint on
    assert not list(store.glob("*.ckpt"))
    resumed = records(c.sh, c.repo, sorted(stopped))

    whole = c.sh(*run, "--force", "--quiet", "--rows", *(n[-1] for n in sorted(stopped)))
    assert whole.rstrip().endswith(f"{len(stopped)} run(s) succeeded, 0 failed"), whole
    assert not epoch_lines(whole) and " epoch " not in whole, whole  # --quiet
    assert all(re.search(rf"\] {n}: SUCCESS on ", whole) for n in stopped), whole
    never = records(c.sh, c.repo, sorted(stopped))
    for n in stopped:
        assert never[n]["train_time_ms"] != resumed[n]["train_time_ms"]  # run, not restored
        assert never[n]["epochs_completed"] == 4 and never[n]["train_images"] == 640
        keys = set(never[n]) | set(resumed[n])
        assert {k: resumed[n].get(k) for k in keys - TIMING - PLACEMENT} == \
            {k: never[n].get(k) for k in keys - TIMING - PLACEMENT}, n


@pytest.mark.slow
def test_grid_run_terminated_then_a_line_per_run_per_epoch(store, cluster, team, shrunk_base,
                                                           tmp_path):
    """SIGTERM (a scheduler's preemption) to the driver as soon as the runs started: exit 143
    with one line, nothing of the runs left running or on disk. The same command runs them
    all, printing a line per run per epoch as the epochs finish, counted over the grid with an
    ETA, each with the test accuracy the run records; then a line per run as it ends, and the
    summary."""
    c = clone(tmp_path, shrunk_base, "pi", INTERRUPTED.replace("0.002", "0.003"))
    rc, out, err = interrupt(c, cluster, team, tmp_path, signal.SIGTERM, r"^started 2 run\(s\)")
    assert rc == 143, (rc, out, err[-3000:])
    one_interrupt_line(err, "SIGTERM")
    again = c.sh(sys.executable, "-m", "ablation.grid", "run", "grids/pi.yaml", "--address",
                 cluster, "--dvc-remote", str(c.storage))
    assert again.rstrip().endswith("2 run(s) succeeded, 0 failed"), again
    lines = epoch_lines(again)
    assert sorted((n, s, e, es) for _, _, n, s, e, es, _, _ in lines) == [
        (n, "train@mnist-resnet18", e, 4) for n in ("pi-a", "pi-b") for e in (1, 2, 3, 4)], again
    assert [(k, t) for k, t, *_ in lines] == [(k, 8) for k in range(1, 9)], again
    assert all(0 <= a <= 100 and ips > 0 for *_, a, ips in lines), again
    rec = records(c.sh, c.repo, ("pi-a", "pi-b"))
    for _, _, n, _, e, _, a, _ in lines:  # the last epoch's figure is the one recorded
        if e == 4:
            assert a == round(rec[n]["test_accuracy"], 2), (n, a, rec[n]["test_accuracy"])
    for n in ("pi-a", "pi-b"):  # its epochs in order, then its end line
        at = [again.index(f"{n} train@mnist-resnet18 epoch {e}/4:") for e in (1, 2, 3, 4)]
        end = re.search(rf"^\[\d/2 runs done, \d running or waiting, ETA [\d.]+ min\] {n}: "
                        rf"SUCCESS on \S+ \(GPUs \d\)$", again, re.M)
        assert end and at == sorted(at) and at[-1] < end.start(), again
    assert not list(store.glob("*.ckpt"))


SEARCHED = """name: se
targets: [train]
set: {data.datasets: [mnist], data.train_limit: 640, data.test_limit: 200, train.epochs: 2,
      train.threads: 1, train.device: cpu}
columns:
  - {label: acc %, metric: test_accuracy, fmt: .2f}
factorial: {train.lr: [0.002, 0.001, 1.0e-7]}
search: {column: acc %, sampler: random, pruner: median, trials: 3, top: 2, seeds: 2,
         margin: 1.0, sampler_seed: SEED}
"""
LEARNS = (0.002, 0.001)  # the third, 1e-7, learns nothing in an epoch: the one to prune


def seed_proposing_last(bad, values):
    """A sampler seed whose random proposals reach `bad` only after every other value (the
    driver asks one setting at a time, repeats included), from Optuna itself."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(200):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        seen = []
        while len(seen) < len(values):
            t = study.ask({"train.lr": CategoricalDistribution(values)})
            if t.params["train.lr"] not in seen:
                seen.append(t.params["train.lr"])
            study.tell(t, 0.0)
        if seen[-1] == bad:
            return seed
    raise AssertionError("no such seed in 200")


@pytest.mark.slow
def test_a_search_prunes_is_killed_resumes_and_confirms_on_the_cluster(store, cluster, team,
                                                                      shrunk_base, tmp_path):
    """One trial at a time on the two-node cluster: SIGTERM to the driver while its second
    trial runs (exit 143, one line, nothing left running); the same command resumes: the
    stopped setting runs again as the same experiment, the third (which learns nothing) is
    pruned after its first epoch, the best two are confirmed at seeds 1-2, and every trial is
    one experiment, once; the report lists the search."""
    seed = seed_proposing_last(1.0e-7, [*LEARNS, 1.0e-7])
    c = clone(tmp_path, shrunk_base, "se", SEARCHED.replace("SEED", str(seed)))
    env = dict(c.env, **team[1]("driver"))
    cmd = [sys.executable, "-m", "ablation.grid", "search", "grids/se.yaml", "--address",
           cluster, "--dvc-remote", str(c.storage), "--parallel", "1"]
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"
    with open(out, "w") as o, open(err, "w") as e:
        d = subprocess.Popen(cmd, cwd=c.repo, env=env, stdout=o, stderr=e,
                             start_new_session=True)
    try:
        wait_for(lambda: re.search(r": complete [\d.]+\n(.*\n)*trial \d+: se-", out.read_text())
                 or d.poll() is not None, 300, "the second trial's start")
        assert d.poll() is None, (out.read_text(), err.read_text()[-3000:])
        time.sleep(5)
        os.kill(d.pid, signal.SIGTERM)
        d.wait(timeout=120)
    finally:
        if d.poll() is None:
            os.killpg(d.pid, signal.SIGKILL)
            d.wait()
    first = out.read_text()
    assert d.returncode == 143, (first, err.read_text()[-3000:])
    assert "1 trial(s) stopped and queued again" in one_interrupt_line(err.read_text(),
                                                                       "SIGTERM")
    assert not running("se-")

    again = c.sh(*cmd)
    stopped = re.findall(r"trial \d+: (se-\w+-s0)", first)[-1]
    assert re.search(rf"trial \d+: {stopped} ", again), again  # the same experiment again
    pruned = re.findall(r"(se-\w+-s0): pruned after epoch 1", again)
    assert len(pruned) == 1, again
    assert "search spent 3 trial(s) (1 pruned)" in again, again
    assert "confirming the best 2 setting(s) at seeds 1-2: 4 run(s) to run" in again, again
    assert "best confirmed: " in again, again
    names = [n for n in c.sh("dvc", "exp", "list", "--name-only").split() if n.startswith("se-")]
    assert len(names) == len(set(names)) == 7, names  # 3 trials, 2 settings x 2 seeds
    assert sum(n.endswith("-s0") for n in names) == 3
    rec = records(c.sh, c.repo, pruned)[pruned[0]]
    assert rec["pruned"] is True and rec["epochs_completed"] == 1
    c.sh(sys.executable, "-m", "ablation.report", "grids/se.yaml")
    md = (c.repo / "reports" / "se.md").read_text()
    assert "## Search" in md and "| pruned |" in md and "**best confirmed: " in md
