"""Benchmark: the libsvm and gram SVM backends side by side on one training subset.

    python -m ablation.bench.svm [--data data/prepared/mnist.npz] [--samples 10000] [--repeats 1]

Fits both backends on the same seeded subset, predicts the full test set, and prints fit and
predict times (median over repeats), their ratios, accuracy and the agreement of predictions.
Writes bench/out/svm.json.
"""
import os
import platform
import statistics
import time

import torch

from ablation.core.cli import Parser, run
from ablation.core.io import write_json
from ablation.training import svc
from ablation.training.datasets import load_prepared


def main(data, samples, repeats, kernels=("rbf", "poly"), out="bench/out/svm.json"):
    d = load_prepared(data)
    idx = svc.subset(len(d["train_labels"]), samples, 0)
    X, y = svc.features(d["train_images"][idx]), d["train_labels"][idx]
    cfg = {"C": 1.0, "gamma": "scale", "degree": 3}
    rows = []
    for kind in kernels:
        res = {}
        for backend in ("libsvm", "gram"):
            fits, preds = [], []
            for _ in range(repeats):
                model, fit_s, clf = svc.fit(X, y, kind, cfg, backend)
                t0 = time.perf_counter()
                pred = clf.predict(svc.features(d["test_images"])) if backend == "libsvm" \
                    else svc.predict(model, d["test_images"])
                preds.append(time.perf_counter() - t0)
                fits.append(fit_s)
            res[backend] = {"fit_s": statistics.median(fits),
                            "predict_s": statistics.median(preds), "pred": pred}
        L, G = res["libsvm"], res["gram"]
        row = {"kernel": kind, "samples": samples,
               "libsvm_fit_s": L["fit_s"], "libsvm_predict_s": L["predict_s"],
               "gram_fit_s": G["fit_s"], "gram_predict_s": G["predict_s"],
               "speedup_fit": L["fit_s"] / G["fit_s"],
               "speedup_predict": L["predict_s"] / G["predict_s"],
               "speedup_total": (L["fit_s"] + L["predict_s"]) / (G["fit_s"] + G["predict_s"]),
               "agreement": float((L["pred"] == G["pred"]).mean()),
               "accuracy_libsvm": 100 * float((L["pred"] == d["test_labels"]).mean()),
               "accuracy_gram": 100 * float((G["pred"] == d["test_labels"]).mean())}
        rows.append(row)
        print(f"{kind:5s} fit {row['libsvm_fit_s']:.1f}s -> {row['gram_fit_s']:.1f}s "
              f"({row['speedup_fit']:.1f}x)  predict {row['libsvm_predict_s']:.1f}s -> "
              f"{row['gram_predict_s']:.1f}s ({row['speedup_predict']:.1f}x)  "
              f"total {row['speedup_total']:.1f}x  agreement {100 * row['agreement']:.2f}%  "
              f"accuracy {row['accuracy_libsvm']:.2f}% / {row['accuracy_gram']:.2f}%")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    write_json({"data": data, "repeats": repeats, "machine": machine, "rows": rows}, out)
    print(f"machine: {machine}; wrote {out}")
    return rows


def _cli(argv):
    ap = Parser(prog="python -m ablation.bench.svm",
                description="The libsvm and gram SVM backends side by side on one training "
                            "subset; writes bench/out/svm.json.")
    ap.add_argument("--data", default="data/prepared/mnist.npz",
                    help="prepared dataset (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=10000,
                    help="training images, a seeded subset (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fits per backend and kernel; the median is kept (default: %(default)s)")
    a = ap.parse_args(argv)
    main(a.data, a.samples, a.repeats)


if __name__ == "__main__":
    run(_cli)
