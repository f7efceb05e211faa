"""Benchmark: training throughput of the study's way of training vs this repository's.

    python -m ablation.bench [--models resnet18 resnet50] [--batches 16 32] [--steps 20]
                             [--repeats 3] [--devices cpu cuda]          (or: make bench)

For each model, batch size, optimizer and available device, in one process:
  reference  a torchvision.datasets.MNIST-style dataset (PIL image per sample, ToTensor,
             Normalize), a stock DataLoader, the stock torchvision model, the default
             optimizer implementation: how the study trained;
  ours       the train stage's own loop (train.train_one_epoch over train.epoch_batches) with
             its model (CPU: the small-map matmul path) and fused optimizer.
Both train on the same real images for `steps` steps after a warm-up; images/s is the median
over `repeats`. Achieved model FLOP/s = 3 x forward GFLOPs (fvcore: one multiply-add = one
flop) x images/s, shown as a share of the machine's measured dense matmul rate in the same
convention (multiply-adds per second). Writes bench/out/bench.json and bench/out/bench.md.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import models, train
from .prepare import load as load_prepared

WARMUP = 3  # steps before timing: allocator and oneDNN/cuDNN kernel selection


class PILDataset(torch.utils.data.Dataset):
    """Per-sample PIL + ToTensor + Normalize, as torchvision.datasets.MNIST serves images."""

    def __init__(self, images, labels, mean, std):
        from torchvision import transforms
        self.images, self.labels = images, labels
        self.tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.tf(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def matmul_rate(device, n=2048, reps=5):
    """Dense fp32 matmul multiply-adds per second (median of reps)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    ts = []
    for _ in range(reps):
        train.sync(device)
        t = time.perf_counter()
        a @ b
        train.sync(device)
        ts.append(time.perf_counter() - t)
    return n ** 3 / statistics.median(ts)


def reference_ips(name, bs, opt_name, device, d, steps):
    """images/s of the study's loop over `steps` steps after WARMUP."""
    n = (steps + WARMUP) * bs
    ds = PILDataset(d["train_images"][:n], d["train_labels"][:n], float(d["mean"]), float(d["std"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True,
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = models.build(name).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if opt_name == "adam" else \
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    t0 = None
    for i, (x, y) in enumerate(loader):
        if i == WARMUP:
            train.sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    train.sync(device)
    return steps * bs / (time.perf_counter() - t0)


def ours_ips(name, bs, opt_name, device, d, steps, loader):
    """images/s of the train stage's own epoch loop over WARMUP + steps batches."""
    n = (steps + WARMUP) * bs
    cfg = {"optimizer": opt_name, "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
           "batch_size": bs, "seed": 0, "num_workers": 0, "loader": loader}
    torch.manual_seed(0)
    model = models.build(name)
    if device.type == "cpu":
        models.fast_small_maps(model)
    model.to(device)
    ctx = {"device": device, "mean": float(d["mean"]), "std": float(d["std"]),
           "cl": device.type == "cuda", "amp": False}
    if ctx["cl"]:
        model.to(memory_format=torch.channels_last)
    opt = train.make_optimizer(model, cfg, device)
    x = torch.from_numpy(d["train_images"][:n])
    y = torch.from_numpy(d["train_labels"][:n].astype(np.int64))
    if loader == "resident":
        x, y = x.to(device), y.to(device)
    # warm-up on WARMUP batches, then time a full pass over `steps` batches
    train.train_one_epoch(model, opt, train.epoch_batches(x[:WARMUP * bs], y[:WARMUP * bs], cfg,
                                                          device, 0, False), ctx, lambda k: None)
    _, _, _, elapsed, _ = train.train_one_epoch(
        model, opt, train.epoch_batches(x[:steps * bs], y[:steps * bs], cfg, device, 1,
                                        device.type == "cuda"), ctx, lambda k: None)
    return steps * bs / elapsed


def main(data, model_names, batches, optimizers, devices, steps, repeats, out_dir):
    d = load_prepared(data)
    rows = []
    for dev in devices:
        device = torch.device(dev)
        rate = matmul_rate(device)
        loader = "resident" if dev == "cuda" else "dataloader"
        for name in model_names:
            gfl = models.gflops(name, "imagenet")
            for bs in batches:
                for opt_name in optimizers:
                    ref, ours = [], []
                    for _ in range(repeats):  # interleaved, so drift hits both alike
                        ref.append(reference_ips(name, bs, opt_name, device, d, steps))
                        ours.append(ours_ips(name, bs, opt_name, device, d, steps, loader))
                    r, o = statistics.median(ref), statistics.median(ours)
                    row = {"device": dev, "model": name, "batch": bs, "optimizer": opt_name,
                           "reference_ips": r, "ours_ips": o, "ratio": o / r,
                           "ours_mfu": 3 * gfl * 1e9 * o / rate, "ours_loader": loader}
                    rows.append(row)
                    print(f"{dev} {name} batch {bs} {opt_name}: reference {r:.0f} img/s, "
                          f"ours {o:.0f} img/s, {o / r:.2f}x, "
                          f"{100 * row['ours_mfu']:.1f}% of matmul rate", flush=True)
        rows_dev = [r for r in rows if r["device"] == dev]
        for r in rows_dev:
            r["matmul_gmacs"] = rate / 1e9
    machine = describe_machine(devices)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({"machine": machine, "steps": steps, "repeats": repeats, "rows": rows}, f,
                  indent=2)
    md = [f"Machine: {machine}; {steps} timed steps after {WARMUP} warm-up, median of "
          f"{repeats} interleaved repeats.", "",
          "| device | model | batch | optimizer | reference img/s | ours img/s | ratio | "
          "ours model FLOP/s vs matmul |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['optimizer']} | "
                  f"{r['reference_ips']:.0f} | {r['ours_ips']:.0f} | {r['ratio']:.2f}x | "
                  f"{100 * r['ours_mfu']:.1f}% |")
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return rows


def describe_machine(devices):
    parts = [train.device_name(torch.device("cpu"))]
    if "cuda" in devices:
        parts.append(torch.cuda.get_device_name())
    return ", ".join(parts) + f"; torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m ablation.bench")
    ap.add_argument("--data", default="data/prepared/mnist.npz")
    ap.add_argument("--models", nargs="+", default=list(models.BUILDERS))
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sgd"])
    ap.add_argument("--devices", nargs="+",
                    default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out")
    a = ap.parse_args()
    main(a.data, a.models, a.batches, a.optimizers, a.devices, a.steps, a.repeats, a.out)
