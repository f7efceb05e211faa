"""One short real training run with the GPU options, its accuracy checked (bench/gpu_check.sh).

    PYTHONPATH=src python -m ablation.gpu_check --data data/prepared/mnist.npz --out OUT \
        [--config bench/gpu_check.json] [--device cuda] [--min-accuracy 97]

The run's settings are bench/gpu_check.json (`data` and `train` sections, checked against the
params schema like params.yaml): the resident loader, bf16 autocast, channels_last (on by
default on cuda), one epoch. JSON, not YAML, and no dvc/dvclive/fvcore: the lent GPU machine has
only torch, torchvision and numpy. Exit status 1 when a model ends below --min-accuracy.
"""
import json
import os

from . import models, params as P, train
from .cli import Parser, UserError, run

CONFIG = "bench/gpu_check.json"
MIN_ACCURACY = 97.0  # % MNIST test accuracy after one epoch: ResNet-18 reaches 98-99 %, chance 10


def torch_gflops(name, stem):
    """Forward GFLOPs from torch's own counter (multiply-add = 1, as fvcore), no BatchNorm/ReLU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        models.build(name, stem).eval()(torch.zeros(1, 1, 28, 28))
    return fc.get_total_flops() / 2 / 1e9  # it counts a multiply-add as 2 flops


def main(data, out, config=CONFIG, device=None, min_accuracy=MIN_ACCURACY, overrides=None):
    """Train every model of the config on `data`; returns {model: metrics}; raises if one is
    below `min_accuracy`."""
    try:
        with open(config) as f:
            p = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{config}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{config}: JSON syntax error at line {e.lineno}: {e.msg}") from None
    for section, over in (overrides or {}).items():
        p.setdefault(section, {}).update(over)
    if device:
        p.setdefault("train", {})["device"] = device
    p = P.validate(p, ["data", "train"], source=config)
    try:
        import fvcore  # noqa: F401
    except ImportError:  # train.main reports GFLOPs; count them with torch here instead
        models.gflops = torch_gflops
    results, low = {}, []
    for name in p["train"]["models"]:
        m = train.main(p["train"], p["data"], data, name, os.path.join(out, f"{name}.json"),
                       os.path.join(out, f"{name}.pt"), progress=False)
        results[name] = m
        if m["test_accuracy"] is None or m["test_accuracy"] < min_accuracy:
            low.append(f"{name} {m['test_accuracy']}")
    print(json.dumps({k: {"test_accuracy": v["test_accuracy"], "images_per_s": v["images_per_s"],
                          "device_name": v["device_name"]} for k, v in results.items()}))
    if low:
        raise AccuracyError(f"below {min_accuracy}% test accuracy: {', '.join(low)}")
    return results


class AccuracyError(Exception):
    pass


def _cli(argv):
    ap = Parser(prog="python -m ablation.gpu_check")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--device")
    ap.add_argument("--min-accuracy", type=float, default=MIN_ACCURACY)
    a = ap.parse_args(argv)
    try:
        main(a.data, a.out, a.config, a.device, a.min_accuracy)
    except AccuracyError as e:
        print(f"gpu_check: FAILED: {e}")
        raise SystemExit(1)


if __name__ == "__main__":
    run(_cli)
