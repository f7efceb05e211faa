"""The SVM engine the svm stage and its benchmark share: features, scikit-learn SVC fits with
two backends, and prediction from a saved model (no pickle).

Backends (params `svm.backend`):
  libsvm  plain SVC(kernel=...): libsvm evaluates kernel rows one at a time on one core;
  gram    the kernel matrix in bulk with a float64 matrix product (torch), then
          SVC(kernel="precomputed"); prediction needs kernel rows only against the support
          vectors and uses libsvm's one-vs-one vote, so the model is the same;
  auto    gram while its n x n float64 matrix fits GRAM_RAM_SHARE of RAM, else libsvm.
"""
import os
import time

import numpy as np
from sklearn.svm import SVC

from ablation.training.models import kernel

GRAM_RAM_SHARE = 0.25  # auto: the largest share of RAM the training Gram matrix may take
PREDICT_CHUNK = 2000  # test images per kernel block at predict time


def features(images):
    """uint8 (N, H, W) -> float32 (N, H * W) in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def resolve_gamma(gamma, X):
    """scikit-learn's rule: 'scale' = 1 / (n_features * X.var()), 'auto' = 1 / n_features."""
    if gamma == "scale":
        return 1.0 / (X.shape[1] * X.astype(np.float64).var())
    if gamma == "auto":
        return 1.0 / X.shape[1]
    return float(gamma)


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


def predict(model, images):
    """Class labels for uint8 images with a saved model (dict or .npz path)."""
    if isinstance(model, str):
        with np.load(model, allow_pickle=False) as z:
            model = {k: z[k] for k in z.files}
    X = features(images)
    out = []
    for i in range(0, len(X), PREDICT_CHUNK):
        K = kernel(X[i:i + PREDICT_CHUNK], model["support_vectors"], str(model["kernel"]),
                   float(model["gamma"]), int(model["degree"]), float(model["coef0"]))
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


def fit(X, y, kind, cfg, backend):
    """Fit one SVC; return (model dict, fit seconds, fitted SVC). Timing includes the Gram
    matrix."""
    gamma = resolve_gamma(cfg["gamma"], X)
    t0 = time.perf_counter()
    if backend == "gram":
        clf = SVC(kernel="precomputed", C=cfg["C"])
        clf.fit(kernel(X, X, kind, gamma, cfg["degree"]), y)
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
