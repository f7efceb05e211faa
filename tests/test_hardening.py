"""Faults for real: SIGKILL during each stage, corrupt checkpoints, bad input at the CLI.

Every kill waits for an event the process makes visible (a line in its log, a checkpoint on
disk), never for a time, so it lands at the same point on a fast or a slow machine.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ablation.core import cli, io
from ablation.stages import train

from .helpers import PARAMS, ROOT


@pytest.fixture(scope="module")
def params_text():
    with open(PARAMS) as f:
        return f.read()


def env(**kw):
    return dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), **kw)


def start(args, cwd, log, **kw):
    """Start `python -m args` with stdout and stderr going to the file `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env(**kw),
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def kill_when(proc, ready, log, timeout=120):
    """SIGKILL `proc` as soon as ready() holds; fail if it ended first."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"process ended before the kill:\n{open(log).read()}"
        if time.time() - t0 >= timeout:  # never leave it running behind a failed test
            proc.kill()
            proc.wait()
            raise AssertionError("condition for the kill never held")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def logged(log, text):
    """A kill condition: `text` has appeared in the file `log`."""
    return lambda: os.path.exists(log) and text in open(log).read()


def leftovers(d):
    return [p for p in glob.glob(os.path.join(d, "**", ".*tmp*"), recursive=True)]


def test_sigkill_during_prepare_leaves_no_output_then_completes(mirror, tmp_path):
    out = tmp_path / "data" / "prepared" / "fashion_mnist.npz"
    log = str(tmp_path / "log")
    p = start(["ablation.stages.prepare", "fashion_mnist", str(out)], tmp_path, log,
              DATA_MIRROR=mirror)
    kill_when(p, logged(log, "verifying"), log)  # while decompressing and hashing
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "ablation.stages.prepare", "fashion_mnist", str(out)],
                       cwd=tmp_path, env=env(DATA_MIRROR=mirror), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and leftovers(str(tmp_path)) == []


def test_sigkill_while_writing_leaves_no_half_file(tmp_path):
    """A writer killed between writing its temp file and the rename: the target never exists
    half-written, and the next write removes the dead writer's temp file."""
    target = tmp_path / "m.json"
    code = ("import os, sys; from ablation.core import io\n"
            "def w(tmp):\n    open(tmp, 'w').write('{\"half\": ')\n    os.kill(os.getpid(), 9)\n"
            f"io.replace_atomic(w, {str(target)!r})\n")
    r = subprocess.run([sys.executable, "-c", code], env=env())
    assert r.returncode == -signal.SIGKILL
    assert not target.exists() and len(leftovers(str(tmp_path))) == 1
    io.write_json({"ok": 1}, str(target))
    assert json.loads(target.read_text()) == {"ok": 1} and leftovers(str(tmp_path)) == []


def write_params(tmp_path, params_text, **train_over):
    p = yaml.safe_load(params_text)
    p["data"]["train_limit"] = None
    p["train"].update({"epochs": 2, "device": "cpu", **train_over})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return p, path


def train_args(data, d, params_path):
    return ["ablation.stages.train", "--params", str(params_path), "--data", data,
            "--model", "resnet18", "--metrics", str(d / "m.json"), "--out", str(d / "m.pt"),
            "--ckpt", str(d / "m.ckpt"), "--live", str(d / "live")]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_the_uninterrupted_result(params_text, synthetic,
                                                                tmp_path):
    p, ppath = write_params(tmp_path, params_text)
    full = train.main(p["train"], p["data"], synthetic, "resnet18",
                      str(tmp_path / "full" / "m.json"), str(tmp_path / "full" / "m.pt"),
                      progress=False)
    d = tmp_path / "cut"
    log = str(tmp_path / "log")
    proc = start(train_args(synthetic, d, ppath), tmp_path, log)
    # the epoch-1 checkpoint appears (atomically, complete) as epoch 2's batches start
    kill_when(proc, (d / "m.ckpt").exists, log)
    ck = torch.load(d / "m.ckpt", weights_only=True)
    assert ck["complete"] is False and ck["epoch"] == 1
    assert not (d / "m.json").exists() and not (d / "m.pt").exists()
    r = subprocess.run([sys.executable, "-m", *train_args(synthetic, d, ppath)], cwd=tmp_path,
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming resnet18 from checkpoint" in r.stdout and "after epoch 1" in r.stdout
    resumed = json.loads((d / "m.json").read_text())
    for k in ("test_accuracy", "final_train_loss", "epochs_completed"):
        assert resumed[k] == full[k], k
    assert leftovers(str(d)) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_detected(tmp_path, capsys, damage):
    path = tmp_path / "m.ckpt"
    torch.save({"fingerprint": "fp", "complete": False, "epoch": 1,
                "model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 99,
                      "empty": b""}[damage])
    assert train.load_checkpoint(str(path), "fp") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable" in err and "from scratch" in err


def test_foreign_or_finished_checkpoint_is_not_resumed(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"fingerprint": "other params", "complete": False, "epoch": 1}, path)
    assert train.load_checkpoint(str(path), "fp") is None
    torch.save({"fingerprint": "fp", "complete": True}, path)
    assert train.load_checkpoint(str(path), "fp") is None
    torch.save({"fingerprint": "fp", "complete": False, "epoch": 1}, path)
    assert train.load_checkpoint(str(path), "fp")["epoch"] == 1


def test_stage_restarts_from_scratch_over_a_garbage_checkpoint(params_text, synthetic,
                                                              tmp_path):
    p, ppath = write_params(tmp_path, params_text, epochs=1)
    d = tmp_path / "run"
    d.mkdir()
    (d / "m.ckpt").write_bytes(b"PK\x03\x04 half a zip, as a crash might leave")
    r = subprocess.run([sys.executable, "-m", *train_args(synthetic, d, ppath)], cwd=tmp_path,
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "checkpoint" in line]
    assert len(lines) == 1 and "unreadable" in lines[0] and "from scratch" in lines[0]
    assert json.loads((d / "m.json").read_text())["epochs_completed"] == 1


def test_sigkill_during_svm_leaves_no_output_then_completes(params_text, prepared, tmp_path):
    p = yaml.safe_load(params_text)
    p["svm"].update(train_samples=3000, backend="libsvm")
    ppath = tmp_path / "params.yaml"
    ppath.write_text(yaml.safe_dump(p))
    args = ["ablation.stages.svm", "--params", str(ppath), "--data", prepared["mnist"], "--kernel",
            "rbf", "--metrics", str(tmp_path / "o" / "rbf.json"),
            "--out", str(tmp_path / "o" / "svm_rbf.npz")]
    log = str(tmp_path / "log")
    proc = start(args, tmp_path, log)
    kill_when(proc, logged(log, "fitting"), log)  # libsvm needs seconds for 3,000 images
    assert not (tmp_path / "o" / "rbf.json").exists()
    assert not (tmp_path / "o" / "svm_rbf.npz").exists()
    p["svm"]["backend"] = "gram"
    ppath.write_text(yaml.safe_dump(p))
    r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "rbf.json").read_text())["test_accuracy"] > 90


# --- bad input at the command line: exit 2, one line, no traceback, nothing written ----------

BAD_PARAMS = [  # (line of params.yaml, its replacement or a whole file, what the line must say)
    (None, "train: [1, 2\n", "YAML syntax error"),
    (None, "", "file is empty"),
    (None, "data:\n  datasets: [mnist]\n  train_limit: null\n  test_limit: null\n",
     "missing section 'train'"),
    ("  lr: 0.001", "  lr: 0.001\n  learning_rate: 0.1", "unknown key 'train.learning_rate'"),
    ("  lr: 0.001", "  lr: fast", "train.lr = 'fast': allowed: a number > 0"),
    ("  lr: 0.001", "  lr: 0", "train.lr = 0: allowed: a number > 0"),
    ("  epochs: 5", "  epochs: 0", "train.epochs = 0"),
    ("  batch_size: 16", "  batch_size: [16, 32]", "train.batch_size"),
    ("  models: [resnet18]", "  models: resnet18",
     "train.models = 'resnet18': allowed: a non-empty list"),
    ("  models: [resnet18]", "  models: [vgg16]", "resnet18, resnet34, resnet50"),
    ("  optimizer: adam", "  optimizer: lion", "one of sgd, adam"),
    ("  device: auto", "  device: tpu", "one of auto, cpu, cuda, mps"),
    ("  stem: imagenet", "  stem: deep", "one of imagenet, cifar"),
    ("  pin_memory: true", "  pin_memory: sometimes", "true or false"),
    ("  train_limit: null", "  train_limit: -5", "data.train_limit"),
]


@pytest.mark.parametrize("old,new,expect", BAD_PARAMS)
def test_train_cli_bad_params(params_text, tmp_path, capsys, old, new, expect):
    if old is not None:
        assert old in params_text, old
    (tmp_path / "params.yaml").write_text(new if old is None else params_text.replace(old, new))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.run(train._cli, ["--params", str(tmp_path / "params.yaml"), "--data", "x.npz",
                             "--model", "resnet18", "--metrics", str(out / "m.json"),
                             "--out", str(out / "m.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err and "Traceback" not in err
    assert str(tmp_path / "params.yaml") in err and not out.exists()


def test_debug_variable_shows_the_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    r = subprocess.run([sys.executable, "-m", "ablation.stages.svm", "--data", "x", "--kernel",
                        "rbf", "--metrics", "m.json", "--out", "m.npz"], cwd=tmp_path,
                       env=env(ABLATION_DEBUG="1"), capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr


def test_stages_write_only_under_their_declared_outputs():
    """Every output path in dvc.yaml lies under data/, models/, metrics/ (reports/ by report)."""
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        stages = yaml.safe_load(f)["stages"]
    for name, st in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for o in st.get(kind, []):
                path = o if isinstance(o, str) else next(iter(o))
                assert path.split("/")[0] in ("data", "models", "metrics"), (name, path)


def _tree(d):
    """{relative path: (size, mtime_ns)} of every file under `d`."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("stage, item", [("train", {"dataset": "mnist", "model": "resnet18"}),
                                         ("svm", {"dataset": "mnist", "kernel": "rbf"})])
def test_a_stage_writes_exactly_its_declared_outputs(tmp_path, defaults, synthetic, stage, item):
    """Run the stage's own dvc.yaml command (its ${item.*} filled in) in an empty directory with
    a shrunk params.yaml and a synthetic prepared file: every file it creates or changes lies at
    or under one of its declared outs, metrics and plots, or is scratch the repository ignores;
    every declared file exists."""
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        st = yaml.safe_load(f)["stages"][stage]

    def fill(text):
        for k, v in item.items():
            text = text.replace(f"${{item.{k}}}", v)
        return text
    declared = [fill(o if isinstance(o, str) else next(iter(o)))
                for kind in ("outs", "metrics", "plots") for o in st.get(kind, [])]
    defaults["data"]["train_limit"] = 64
    defaults["train"].update({"epochs": 1, "device": "cpu", "small_maps": False})
    defaults["svm"]["train_samples"] = 100
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(defaults))
    os.makedirs(tmp_path / "data" / "prepared")
    with open(synthetic, "rb") as f:
        (tmp_path / "data" / "prepared" / "mnist.npz").write_bytes(f.read())
    before = _tree(tmp_path)
    cmd = fill(st["cmd"]).split()
    assert cmd[:2] == ["python", "-m"]
    r = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    after = _tree(tmp_path)
    written = sorted(p for p in after if before.get(p) != after[p])
    assert written
    undeclared = [p for p in written if not any(p == d or p.startswith(d.rstrip("/") + "/")
                                                for d in declared)]
    # the only others: scratch the repository ignores (train's resume checkpoint, dvclive's
    # summary), which DVC neither caches nor git tracks
    ignored = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, capture_output=True,
                             text=True, input="\n".join(undeclared)).stdout.split()
    assert sorted(ignored) == sorted(undeclared), set(undeclared) - set(ignored)
    assert all(p.endswith((".ckpt", "/metrics.json")) for p in undeclared), undeclared
    missing = [d for d in declared if not os.path.exists(tmp_path / d)]
    assert missing == [], missing
