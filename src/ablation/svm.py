"""svm stage: scikit-learn SVC baselines (the study's Table 2) on a seeded training subset.

    python -m ablation.svm --data data/prepared/mnist.npz --kernel rbf \
        --metrics metrics/svm/mnist/rbf.json --out models/mnist/svm_rbf.npz

Backends (params `svm.backend`):
  libsvm  plain SVC(kernel=...): libsvm evaluates kernel rows one at a time on one core;
  gram    the kernel matrix in bulk with a float64 matrix product (torch), then
          SVC(kernel="precomputed"); prediction needs kernel rows only against the support
          vectors and uses libsvm's one-vs-one vote, so the model is the same;
  auto    gram while its n x n float64 matrix fits GRAM_RAM_SHARE of RAM, else libsvm.
The saved model is an .npz (no pickle) with what prediction needs: `predict(model, images)`.
"""
import os
import time

import numpy as np
import torch
from sklearn.svm import SVC

from . import params as P
from .cli import (OutputLock, Parser, UserError, bounded, check_outputs, replace_atomic, run,
                  write_json)
from .prepare import load as load_prepared

GRAM_RAM_SHARE = 0.25  # auto: the largest share of RAM the training Gram matrix may take
PREDICT_CHUNK = 2000  # test images per kernel block at predict time


def features(images):
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def resolve_gamma(gamma, X):
    """scikit-learn's rule: 'scale' = 1 / (n_features * X.var()), 'auto' = 1 / n_features."""
    if gamma == "scale":
        return 1.0 / (X.shape[1] * X.astype(np.float64).var())
    if gamma == "auto":
        return 1.0 / X.shape[1]
    return float(gamma)


def kernel(A, B, kind, gamma, degree, coef0=0.0, device="cpu"):
    """Kernel matrix K[i, j] = k(A[i], B[j]) in float64, computed in bulk with torch."""
    a = torch.as_tensor(A, device=device, dtype=torch.float64)
    b = torch.as_tensor(B, device=device, dtype=torch.float64)
    dot = a @ b.T
    if kind == "rbf":  # exp(-gamma |a - b|^2), |a - b|^2 = |a|^2 + |b|^2 - 2 a.b
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * dot
        K = torch.exp(sq.clamp_(min=0.0).mul_(-gamma))
    elif kind == "poly":
        K = (gamma * dot + coef0) ** degree
    else:
        raise UserError(f"unknown kernel '{bounded(kind, 50)}' (valid: {', '.join(P.KERNELS)})")
    return K.cpu().numpy()


def ovo_predict(K_sv, model):
    """libsvm's one-vs-one vote from kernel rows against the support vectors.

    K_sv: (n, n_SV) kernel values; model: dict with dual_coef (k-1, n_SV), intercept (pairs),
    n_support (k), classes (k). Ties go to the lower class index, as in libsvm.
    """
    nsv, coef = model["n_support"], model["dual_coef"]
    start = np.concatenate([[0], np.cumsum(nsv)])
    k = len(nsv)
    votes = np.zeros((K_sv.shape[0], k), dtype=np.int64)
    p = 0
    for i in range(k):
        si = slice(start[i], start[i + 1])
        for j in range(i + 1, k):
            sj = slice(start[j], start[j + 1])
            dec = K_sv[:, si] @ coef[j - 1, si] + K_sv[:, sj] @ coef[i, sj] + model["intercept"][p]
            votes[:, i] += dec > 0
            votes[:, j] += dec <= 0
            p += 1
    return model["classes"][votes.argmax(1)]


def predict(model, images, device="cpu"):
    """Class labels for uint8 images with a saved model (dict or .npz path)."""
    if isinstance(model, str):
        with np.load(model, allow_pickle=False) as z:
            model = {k: z[k] for k in z.files}
    X = features(images)
    out = []
    for i in range(0, len(X), PREDICT_CHUNK):
        K = kernel(X[i:i + PREDICT_CHUNK], model["support_vectors"], str(model["kernel"]),
                   float(model["gamma"]), int(model["degree"]), float(model["coef0"]), device)
        out.append(ovo_predict(K, model))
    return np.concatenate(out)


def choose_backend(backend, n):
    """auto -> gram if the n x n float64 Gram matrix fits GRAM_RAM_SHARE of RAM."""
    if backend != "auto":
        return backend, None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = 8 * n * n
    pick = "gram" if need <= GRAM_RAM_SHARE * ram else "libsvm"
    return pick, (f"backend auto -> {pick}: Gram matrix {need / 2**30:.2f} GiB, budget "
                  f"{GRAM_RAM_SHARE * ram / 2**30:.1f} GiB ({GRAM_RAM_SHARE:.0%} of RAM)")


def fit(X, y, kind, cfg, backend, device="cpu"):
    """Fit one SVC; return (model dict, fit seconds, fitted SVC). Timing includes the Gram matrix."""
    gamma = resolve_gamma(cfg["gamma"], X)
    t0 = time.perf_counter()
    if backend == "gram":
        clf = SVC(kernel="precomputed", C=cfg["C"])
        clf.fit(kernel(X, X, kind, gamma, cfg["degree"], device=device), y)
        sv = X[clf.support_]
    else:
        clf = SVC(kernel=kind, C=cfg["C"], gamma=gamma, degree=cfg["degree"])
        clf.fit(X, y)
        sv = clf.support_vectors_.astype(np.float32)
    fit_s = time.perf_counter() - t0
    model = {"support_vectors": sv, "dual_coef": clf.dual_coef_, "intercept": clf.intercept_,
             "n_support": clf.n_support_, "classes": clf.classes_, "kernel": np.array(kind),
             "gamma": np.float64(gamma), "degree": np.int64(cfg["degree"]),
             "coef0": np.float64(clf.coef0), "C": np.float64(cfg["C"])}
    return model, fit_s, clf


def subset(n_total, n, seed):
    """Sorted indices of a seeded random subset of size n."""
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def main(cfg, data_path, kind, metrics_path, model_path, device="cpu"):
    """Fit SVC(kind) on cfg['train_samples'] images, score on the full test set."""
    if kind not in P.KERNELS:
        raise UserError(f"unknown kernel '{bounded(kind, 50)}' (valid: {', '.join(P.KERNELS)})")
    check_outputs(metrics_path, model_path)
    d = load_prepared(data_path)
    n = cfg["train_samples"]
    if n > len(d["train_labels"]):
        raise UserError(f"{P.PARAMS_FILE}: svm.train_samples = {n}: above the "
                        f"{len(d['train_labels'])} training images "
                        f"(allowed: 10..{len(d['train_labels'])})")
    idx = subset(len(d["train_labels"]), n, cfg["seed"])
    X, y = features(d["train_images"][idx]), d["train_labels"][idx]
    if len(np.unique(y)) < 2:
        raise UserError(f"{data_path}: the {n} training images drawn hold one class only; an "
                        f"SVM needs two or more")
    with OutputLock(metrics_path):
        backend, why = choose_backend(cfg["backend"], n)
        if why:
            print(why)
        print(f"svm {kind} ({backend}): fitting {n} training images", flush=True)
        model, fit_s, clf = fit(X, y, kind, cfg, backend, device)
        t0 = time.perf_counter()
        pred = clf.predict(features(d["test_images"])) if backend == "libsvm" \
            else predict(model, d["test_images"], device)
        predict_s = time.perf_counter() - t0
        acc = 100.0 * float((pred == d["test_labels"]).mean())
        metrics = {"test_accuracy": acc, "train_time_ms": 1000 * fit_s,
                   "predict_time_ms": 1000 * predict_s, "train_samples": n,
                   "n_support": int(model["n_support"].sum()), "backend": backend, "kernel": kind,
                   "gamma": float(model["gamma"]), "device": str(device),
                   "threads": torch.get_num_threads()}

        def write_model(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **model)
        replace_atomic(write_model, model_path)
        write_json(metrics, metrics_path)
        print(f"svm {kind} ({backend}): test accuracy {acc:.2f}%, fit {fit_s:.1f} s, "
              f"predict {predict_s:.1f} s, {metrics['n_support']} support vectors")
        return metrics


def _cli(argv):
    ap = Parser(
        prog="python -m ablation.svm",
        description="Fit one scikit-learn SVC on a prepared dataset with params.yaml's `svm` "
                    "section and score it on the full test set (dvc.yaml's svm stage).")
    ap.add_argument("--data", required=True, help="prepared dataset (.npz from the prepare stage)")
    ap.add_argument("--kernel", required=True, help=f"one of {', '.join(P.KERNELS)}")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--out", required=True, help="model .npz to write (no pickle)")
    ap.add_argument("--params", default=P.PARAMS_FILE, help="params file (default: %(default)s)")
    a = ap.parse_args(argv)
    cfg = P.load(["svm"], a.params)["svm"]
    main(cfg, a.data, a.kernel, a.metrics, a.out)


if __name__ == "__main__":
    run(_cli)
