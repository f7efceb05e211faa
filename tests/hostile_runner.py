"""Runs hostile-input cases in one process (started by test_hostile.py under a memory cap).

Reads a JSON list of cases on stdin; for each, makes a fresh directory, writes the case's
files, runs the module's command line in-process through cli.run with cwd there, and records
the exit status, what stderr said, whether an exception escaped, and whether any file in the
directory was created, changed or removed. Prints a JSON list of results on stdout.
"""
import contextlib
import hashlib
import importlib
import io
import json
import os
import signal
import sys
import tempfile
import traceback

import numpy as np

from ablation.core import cli

from .helpers import SYNTH_CLASSES, synthetic_arrays

TIMEOUT_S = 60  # a case still running after this is a hang


def npz(kind):
    """A prepared file, valid or broken in one way (`kind`), as bytes."""
    a = synthetic_arrays(n_train=200, n_test=50)
    extra = {}
    if kind == "valid":
        pass
    elif kind == "labels_12":
        a["train_labels"] = a["train_labels"].copy()
        a["train_labels"][3] = 12
    elif kind == "labels_neg":
        a["test_labels"] = a["test_labels"].astype(np.int64)
        a["test_labels"][0] = -1
    elif kind == "flat_images":
        a["train_images"] = a["train_images"].reshape(len(a["train_images"]), 784)
    elif kind == "float_images":
        a["train_images"] = a["train_images"].astype(np.float32) / 255
    elif kind == "more_labels":
        a["train_labels"] = np.concatenate([a["train_labels"], a["train_labels"][:5]])
    elif kind == "zero_images":
        a["test_images"], a["test_labels"] = a["test_images"][:0], a["test_labels"][:0]
    elif kind == "one_class":
        a["train_labels"] = np.zeros_like(a["train_labels"])
    elif kind == "nan_mean":
        extra["mean"] = np.float32("nan")
    elif kind == "zero_std":
        extra["std"] = np.float32(0)
    elif kind == "no_test_images":
        del a["test_images"]
    elif kind == "object_classes":
        extra["classes"] = np.array([1, 2, 3])
    else:
        raise ValueError(kind)
    x = a["train_images"].astype(np.float64) / 255 if a["train_images"].dtype == np.uint8 \
        else a["train_images"]
    arrays = {**a, "mean": np.float32(x.mean()), "std": np.float32(x.std()),
              "classes": np.array(SYNTH_CLASSES), **extra}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_files(d, files):
    for rel, spec in files.items():
        path = os.path.join(d, rel)
        if isinstance(spec, dict) and spec.get("dir"):
            os.makedirs(path, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(spec, str):
            data = spec.encode()
        elif "hex" in spec:
            data = bytes.fromhex(spec["hex"])
        elif "npz" in spec:
            data = npz(spec["npz"])
            if spec.get("truncate"):
                data = data[: len(data) // 2]
        elif "idx" in spec:
            data = idx_file(**spec["idx"])
        else:
            raise ValueError(spec)
        with open(path, "wb") as f:
            f.write(data)


def idx_file(kind, count, damage=None):
    """An IDX file (images or labels) of synthetic content, optionally damaged."""
    import struct
    if kind == "images":
        body = np.zeros((count, 28, 28), np.uint8).tobytes()
        head = struct.pack(">4I", 0x803, count, 28, 28)
    else:
        body = np.zeros(count, np.uint8).tobytes()
        head = struct.pack(">2I", 0x801, count)
    data = head + body
    if damage == "magic":
        data = b"\x00\x00\x09\x99" + data[4:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header_only":
        data = data[:6]
    return data


def snapshot(d):
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d)] = "dir"
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


class Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise Timeout()


MODULES = {"prepare": "ablation.stages.prepare", "train": "ablation.stages.train",  # a case's
           "svm": "ablation.stages.svm", "grid": "ablation.grid.command",          # command
           "report": "ablation.report.command", "gpu_check": "ablation.bench.gpu_check",
           "export": "ablation.stages.export", "models": "ablation.models.command"}


def run_case(case, base):
    d = tempfile.mkdtemp(dir=base)
    write_files(d, case.get("files", {}))
    before = snapshot(d)
    mod = importlib.import_module(MODULES[case["module"]])
    entry = getattr(mod, "_cli", None) or getattr(mod, "cli", None) or mod.main
    err, out = io.StringIO(), io.StringIO()
    old_env = dict(os.environ)
    os.environ.update(case.get("env", {}))
    old_cwd = os.getcwd()
    os.chdir(d)
    code, escaped = None, None
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.run(entry, case["argv"])
        code = 0
    except SystemExit as e:
        code = e.code
    except Timeout:
        escaped = f"hang: still running after {TIMEOUT_S} s"
    except BaseException:  # a traceback is exactly what we look for
        escaped = traceback.format_exc()[-2000:]
    finally:
        signal.alarm(0)
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    after = snapshot(d)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return {"id": case["id"], "code": code, "stderr": err.getvalue()[-5000:],
            "escaped": escaped, "changed": changed}


def main():
    cases = json.load(sys.stdin)
    base = tempfile.mkdtemp(prefix="hostile-")
    results = [run_case(c, base) for c in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
