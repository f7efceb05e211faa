"""The DVC remote: a second clone gets the results by pulling, not by training; experiments
travel between clones with their models. Real git clones, real `make run`, real DVC."""
import filecmp
import os
import subprocess
import sys

import pytest
import yaml

from .helpers import ROOT
from .sshd import sshd

VENV = os.path.dirname(os.path.dirname(sys.executable))  # the project's .venv
SHRUNK = {"data": {"datasets": ["mnist"], "train_limit": 200, "test_limit": 500},
          "train": {"epochs": 1, "device": "cpu"},
          "svm": {"kernels": ["rbf"], "train_samples": 100}}


def test_default_remote_is_outside_the_work_tree():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["dvc", "remote", "list"], cwd=ROOT, capture_output=True, text=True,
                       env=env, check=True)
    name, url = r.stdout.split()[:2]
    assert name == "storage" and os.path.isabs(url)
    assert os.path.commonpath([url, ROOT]) != ROOT  # shared by every clone on this machine
    default = subprocess.run(["dvc", "remote", "default"], cwd=ROOT, capture_output=True,
                             text=True, env=env, check=True).stdout.strip()
    assert default == "storage"


@pytest.mark.slow
def test_second_clone_pulls_instead_of_training_and_experiments_travel(mirror, tmp_path):
    """Two clones, each with its own HOME and cache, share results through a team remote over
    SSH (a real sshd, key auth, set in .dvc/config.local as the README shows): A's shrunk
    `make run` trains and pushes; B's computes nothing, pulls byte-identical outputs."""
    with sshd(str(tmp_path)) as server:
        two_clones(mirror, tmp_path, server)


def two_clones(mirror, tmp_path, server):
    origin, storage = tmp_path / "origin.git", tmp_path / "team-storage"
    url = f"ssh://{server['host']}:{server['port']}{storage}"

    def sh(cwd, *cmd, ok=True):  # each clone from its own HOME
        home = tmp_path / f"home-{os.path.basename(cwd)}"
        env = dict(os.environ, DATA_MIRROR=mirror, HOME=str(home if home.is_dir() else tmp_path),
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert not ok or r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout + r.stderr

    def clone(name):
        d = tmp_path / name
        (tmp_path / f"home-{name}").mkdir()
        sh(tmp_path, "git", "clone", "-q", str(origin), str(d))
        sh(d, "dvc", "remote", "add", "--local", "-d", "team", url)
        sh(d, "dvc", "remote", "modify", "--local", "team", "keyfile", server["key"])
        sh(d, "dvc", "remote", "modify", "--local", "team", "user", server["user"])
        return d

    def make_run(d):  # `make run` itself, with the project's venv
        return sh(d, "make", "run", f"VENV={VENV}", "-o", f"{VENV}/.installed")

    sh(tmp_path, "git", "clone", "-q", "--bare", ROOT, str(origin))
    a = clone("a")
    p = yaml.safe_load((a / "params.yaml").read_text())
    for sec, over in SHRUNK.items():
        p[sec].update(over)
    (a / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = make_run(a)
    assert "Running stage 'train@mnist-resnet18'" in out
    assert "make run: nothing to pull from 'team'" in out
    sh(a, "git", "add", "-A")
    sh(a, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "shrunk run")
    sh(a, "git", "push", "-q", "origin", "HEAD")

    b = clone("b")
    out = make_run(b)
    assert "Running stage" not in out, out  # nothing computed: everything came from the remote
    assert "make run: pulling" in out and "from 'team' (ssh://" in out
    model = "models/mnist/resnet18.pt"
    for path in (model, "models/mnist/svm_rbf.npz", "metrics/resnet/mnist/resnet18.json"):
        assert filecmp.cmp(a / path, b / path, shallow=False), path
    assert "Data and pipelines are up to date" in sh(b, "dvc", "status")
    assert "Data and pipelines are up to date" in sh(b, "dvc", "repro")

    # an experiment in A, pushed with its model; B pulls and applies it
    sh(a, "dvc", "exp", "run", "-n", "lr2", "-S", "train.lr=0.002", "train")
    sh(a, "dvc", "exp", "push", "origin", "lr2")
    assert not filecmp.cmp(a / model, b / model, shallow=False)
    sh(b, "dvc", "exp", "pull", "origin", "lr2")
    sh(b, "dvc", "exp", "apply", "lr2")
    assert filecmp.cmp(a / model, b / model, shallow=False)
    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["lr"] == 0.002


@pytest.mark.slow
def test_fresh_clone_with_no_reachable_remote_computes_and_says_why(mirror, tmp_path):
    """A default remote nobody answers at (a closed port): `make run` says so in one line
    before any work, computes everything, pushes nothing and ends without DVC's errors."""
    from .sshd import free_port
    d = tmp_path / "c"
    env = dict(os.environ, DATA_MIRROR=mirror, HOME=str(tmp_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(["git", "clone", "-q", ROOT, str(d)], check=True, env=env)
    subprocess.run(["dvc", "remote", "add", "--local", "-d", "team",
                    f"ssh://127.0.0.1:{free_port()}/nowhere"], cwd=d, check=True, env=env,
                   capture_output=True)
    p = yaml.safe_load((d / "params.yaml").read_text())
    for sec, over in SHRUNK.items():
        p[sec].update(over)
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = subprocess.run(["make", "run", f"VENV={VENV}", "-o", f"{VENV}/.installed"], cwd=d,
                       env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    said = [line for line in out.splitlines() if line.startswith("make run: ")]
    assert len(said) == 1 and "DVC remote 'team' (ssh://127.0.0.1:" in said[0] \
        and "not reachable" in said[0] and "nothing will be pushed" in said[0], said
    assert "Running stage 'train@mnist-resnet18'" in out
    assert "ERROR" not in out and "Pulling data" not in out, out[-3000:]
    assert (d / "models/mnist/resnet18.pt").is_file()
