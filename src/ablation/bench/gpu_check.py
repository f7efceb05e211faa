"""One short real training run with the GPU options, its accuracy checked (bench/gpu_check.sh).

    PYTHONPATH=src python -m ablation.bench.gpu_check --data data/prepared/mnist.npz --out OUT \
        [--config bench/gpu_check.json] [--device cuda] [--min-accuracy 97]

The run's settings are bench/gpu_check.json (`data` and `train` sections, checked against the
params schema like params.yaml): the resident loader, bf16 autocast, channels_last (on by
default on cuda), one epoch. JSON, not YAML, and no dvc/dvclive/fvcore: the lent GPU machine has
only torch, torchvision and numpy. Exit status 1 when a model ends below --min-accuracy.
"""
import json
import os
import subprocess
import sys

from ablation.core.cli import Parser, UserError, read_config, run
from ablation.core.io import write_json
from ablation.core.outputs import record_path
from ablation.training import params

CONFIG = "bench/gpu_check.json"
MIN_ACCURACY = 97.0  # % MNIST test accuracy after one epoch: ResNet-18 reaches 98-99 %, chance 10


def main(data, out, config=CONFIG, device=None, min_accuracy=MIN_ACCURACY, overrides=None):
    """Train every model of the config on `data`; returns {model: metrics}; raises if one is
    below `min_accuracy`."""
    p = read_config(config)
    if not isinstance(p, dict):  # validate says what is wrong, in one line
        params.validate(p, ["data", "train"], source=config)
    for section, over in (overrides or {}).items():
        p.setdefault(section, {}).update(over)
    if device:
        p.setdefault("train", {})["device"] = device
    p = params.validate(p, ["data", "train"], source=config)
    resolved = os.path.join(out, "params.json")  # what the runs read: the record of the check
    write_json(p, resolved)
    results, low = {}, []
    for name in p["train"]["models"]:  # the train stage itself, as dvc runs it
        metrics = os.path.join(out, f"{name}.json")
        r = subprocess.run([sys.executable, "-m", "ablation.stages.train", "--params", resolved,
                            "--data", data, "--model", name, "--metrics", metrics,
                            "--out", os.path.join(out, f"{name}.pt")])
        if r.returncode == 2:
            raise UserError(f"gpu_check: the train stage refused {name} (its error is above)")
        if r.returncode:
            raise StageError(f"the train stage crashed for {name} (exit {r.returncode}; its "
                             f"output is above)")
        m = {}
        for path in (metrics, record_path(metrics)):  # measurements, then where it ran
            with open(path) as f:
                m.update(json.load(f))
        results[name] = m
        if m["test_accuracy"] is None or m["test_accuracy"] < min_accuracy:
            low.append(f"{name} {m['test_accuracy']}")
    print(json.dumps({k: {"test_accuracy": v["test_accuracy"], "images_per_s": v["images_per_s"],
                          "device_name": v["device_name"]} for k, v in results.items()}))
    if low:
        raise AccuracyError(f"below {min_accuracy}% test accuracy: {', '.join(low)}")
    return results


class AccuracyError(Exception):
    """A model trained but ended below the bar."""


class StageError(Exception):
    """The train stage itself failed (a crash, not a low accuracy)."""


def _cli(argv):
    ap = Parser(prog="python -m ablation.bench.gpu_check",
                description="One short real training run per model of the config with the GPU "
                            "options; fails (exit 1) when a model ends below --min-accuracy.")
    ap.add_argument("--data", required=True, help="prepared dataset (.npz), e.g. MNIST")
    ap.add_argument("--out", required=True, help="directory for each model's metrics and file")
    ap.add_argument("--config", default=CONFIG,
                    help="JSON with `data` and `train` sections (default: %(default)s)")
    ap.add_argument("--device", help="override train.device (e.g. cuda, cpu)")
    ap.add_argument("--min-accuracy", type=float, default=MIN_ACCURACY,
                    help="test accuracy %% every model must reach (default: %(default)s)")
    a = ap.parse_args(argv)
    try:
        main(a.data, a.out, a.config, a.device, a.min_accuracy)
    except (AccuracyError, StageError) as e:
        print(f"gpu_check: FAILED: {e}")
        raise SystemExit(1)


if __name__ == "__main__":
    run(_cli)
