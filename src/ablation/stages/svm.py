"""svm stage: scikit-learn SVC baselines (the study's Table 2) on a seeded training subset.

    python -m ablation.stages.svm --data data/prepared/mnist.npz --kernel rbf \
        --metrics metrics/svm/mnist/rbf.json --out models/mnist/svm_rbf.npz

Reads params.yaml section `svm` and data.test_limit (a fixed subset of the test split, the
train stage's); the backends are svc.py's. The saved model is an .npz (no
pickle) with what prediction needs: `svc.predict(model, images)`.
"""
import socket
import time

import numpy as np
import torch

from ablation.core.cli import Parser, UserError, lookup, run
from ablation.core.cores import CoreHold, machine_cores
from ablation.core.io import OutputLock, check_outputs, save_npz, write_metrics
from ablation.core.outputs import record_path
from ablation.training.datasets import limited, load_prepared
from ablation.training.engine import cpu_isa, device_name
from ablation.training.models import KERNELS
from ablation.training.params import METRICS, PARAMS_FILE
from ablation.training.params import load as load_params
from ablation.training.svc import choose_backend, features, fit, predict, subset


def main(cfg, data_path, kind, metrics_path, model_path, test_limit=None):
    """Fit SVC(kind) on cfg['train_samples'] images, score on the test set (`test_limit`: a
    fixed subset of it) on the CPU: libsvm and the Gram matrix both run there."""
    lookup(KERNELS, kind, "kernel")
    check_outputs(metrics_path, record_path(metrics_path), model_path)
    d = load_prepared(data_path)
    n = cfg["train_samples"]
    if n > len(d["train_labels"]):
        raise UserError(f"{PARAMS_FILE}: svm.train_samples = {n}: above the "
                        f"{len(d['train_labels'])} training images "
                        f"(allowed: 10..{len(d['train_labels'])})")
    idx = subset(len(d["train_labels"]), n, cfg["seed"])
    X, y = features(d["train_images"][idx]), d["train_labels"][idx]
    if len(np.unique(y)) < 2:
        raise UserError(f"{data_path}: the {n} training images drawn hold one class only; an "
                        f"SVM needs two or more")
    te = limited(len(d["test_labels"]), test_limit, "test")
    x_te, y_te = d["test_images"][te], d["test_labels"][te]
    backend, why = choose_backend(cfg["backend"], n)
    # the gram backend computes its kernel matrix with torch's threads, libsvm fits on one: the
    # fit holds as many of the machine's cores (core/cores.py), so an svm beside training
    # never oversubscribes them
    threads = 1 if backend == "libsvm" else min(torch.get_num_threads(), len(machine_cores()))
    with OutputLock(metrics_path), CoreHold(threads, lambda t: print(t, flush=True)):
        if why:
            print(why)
        print(f"svm {kind} ({backend}): fitting {n} training images", flush=True)
        model, fit_s, clf = fit(X, y, kind, cfg, backend)
        t0 = time.perf_counter()
        pred = clf.predict(features(x_te)) if backend == "libsvm" else predict(model, x_te)
        predict_s = time.perf_counter() - t0
        acc = 100.0 * float((pred == y_te).mean())
        metrics = {"test_accuracy": acc, "train_time_ms": 1000 * fit_s,
                   "predict_time_ms": 1000 * predict_s, "train_samples": n,
                   "test_images": len(y_te),
                   "n_support": int(model["n_support"].sum()), "backend": backend, "kernel": kind,
                   "gamma": float(model["gamma"]), "device": "cpu",
                   "device_name": device_name(torch.device("cpu")), "cpu_isa": cpu_isa(),
                   "host": socket.gethostname(),
                   "threads": torch.get_num_threads()}

        save_npz(model, model_path)
        write_metrics(metrics, METRICS["svm"], metrics_path)
        print(f"svm {kind} ({backend}): test accuracy {acc:.2f}%, fit {fit_s:.1f} s, "
              f"predict {predict_s:.1f} s, {metrics['n_support']} support vectors")
        return metrics


def _cli(argv):
    ap = Parser(
        prog="python -m ablation.stages.svm",
        description="Fit one scikit-learn SVC on a prepared dataset with params.yaml's `svm` "
                    "section and score it on the test set (data.test_limit: a fixed subset of "
                    "it; dvc.yaml's svm stage).")
    ap.add_argument("--data", required=True, help="prepared dataset (.npz from the prepare stage)")
    ap.add_argument("--kernel", required=True, choices=list(KERNELS), help="%(choices)s")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--out", required=True, help="model .npz to write (no pickle)")
    ap.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    a = ap.parse_args(argv)
    p = load_params(["svm", "data.test_limit"], a.params)
    main(p["svm"], a.data, a.kernel, a.metrics, a.out, p["data"]["test_limit"])


if __name__ == "__main__":
    run(_cli)
