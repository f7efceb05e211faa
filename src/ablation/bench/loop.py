"""Benchmark: training throughput of the study's way of training vs this repository's.

    python -m ablation.bench [--models resnet18 resnet50] [--batches 16 32] [--steps 20]
                             [--repeats 3] [--devices cpu cuda]          (or: make bench)

For each model, batch size, optimizer and available device, in one process:
  reference  a torchvision.datasets.MNIST-style dataset (PIL image per sample, ToTensor,
             Normalize), a stock DataLoader, the stock torchvision model, the default
             optimizer implementation: how the study trained;
  ours       the train stage's own loop (engine.train_one_epoch over engine.epoch_batches) with
             its model (CPU: the small-map matmul path) and fused optimizer.
Each variant runs in its own child process (spawned once, reused for every configuration),
so each gets the process it has for real: the reference a plain Python process, ours the train
stage's (engine.tune_allocator). The parent hands out one job at a time, alternating between the
two, so they never compete for the cores. Both train on the same real images for `steps` steps
after a warm-up; images/s is the median over `repeats` interleaved repeats.
Achieved model FLOP/s = 3 x forward GFLOPs (fvcore: one multiply-add = one
flop) x images/s, shown as a share of the machine's measured dense matmul rate in the same
convention (multiply-adds per second). Writes bench/out/bench.json and bench/out/bench.md.
"""
import multiprocessing
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ablation.core.cli import Parser, run
from ablation.core.io import replace_atomic, write_json
from ablation.training import engine, models
from ablation.training.datasets import load_prepared
from ablation.training.params import SWITCHES

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
        engine.sync(device)
        t = time.perf_counter()
        a @ b
        engine.sync(device)
        ts.append(time.perf_counter() - t)
    return n ** 3 / statistics.median(ts)


def reference_setup(name, bs, opt_name, device, d, n):
    """The study's loop: a stock DataLoader over per-sample PIL transforms of the first `n`
    training images, the stock torchvision model, torch's default optimizer.
    Returns (loader, model, optimizer)."""
    ds = PILDataset(d["train_images"][:n], d["train_labels"][:n], float(d["mean"]), float(d["std"]))
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True,
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = models.build(name).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if opt_name == "adam" else \
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return loader, model, opt


def reference_ips(name, bs, opt_name, device, d, steps):
    """images/s of the study's loop over `steps` steps after WARMUP."""
    loader, model, opt = reference_setup(name, bs, opt_name, device, d, (steps + WARMUP) * bs)
    t0 = None
    for i, (x, y) in enumerate(loader):
        if i == WARMUP:
            engine.sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    engine.sync(device)
    return steps * bs / (time.perf_counter() - t0)


def our_setup(name, bs, opt_name, device, d, loader="dataloader", precision="fp32",
              compile_mode=None):
    """The train stage's model, optimizer and step context with its default switches (auto):
    returns (cfg, the module the loop calls, optimizer, RunContext)."""
    cfg = {"optimizer": opt_name, "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
           "batch_size": bs, "seed": 0, "num_workers": 0, "loader": loader, "stem": "imagenet",
           "compile": compile_mode is not None, "compile_mode": compile_mode or "auto",
           "precision": precision, **{k: "auto" for k in SWITCHES}}  # the stage's defaults
    sw = engine.resolve_switches(cfg, device)
    _, step_model, opt, _ = engine.setup_model(name, cfg, device, sw)
    ctx = engine.RunContext(device, float(d["mean"]), float(d["std"]), sw["channels_last"],
                            sw["precision"] == "bf16")
    return cfg, step_model, opt, ctx


def ours_ips(name, bs, opt_name, device, d, steps, loader, precision="fp32", compile_mode=None):
    """images/s of the train stage's own epoch loop over WARMUP + steps batches.

    `precision` and `compile_mode` are train.precision and train.compile (None: off); compile
    time falls into the warm-up steps, not the timed ones.
    """
    n = (steps + WARMUP) * bs
    cfg, step_model, opt, ctx = our_setup(name, bs, opt_name, device, d, loader, precision,
                                          compile_mode)
    x = torch.from_numpy(d["train_images"][:n])
    y = torch.from_numpy(d["train_labels"][:n].astype(np.int64))
    if loader == "resident":
        x, y = x.to(device), y.to(device)
    # warm-up on WARMUP batches, then time a full pass over `steps` batches
    engine.train_one_epoch(step_model, opt, engine.epoch_batches(
        x[:WARMUP * bs], y[:WARMUP * bs], cfg, device, 0, False), ctx)
    _, _, _, elapsed, _ = engine.train_one_epoch(
        step_model, opt, engine.epoch_batches(x[:steps * bs], y[:steps * bs], cfg, device, 1,
                                              device.type == "cuda"), ctx)
    return steps * bs / elapsed


_DATA = {}  # the worker process's prepared data, loaded once


def _worker_init(data, tuned):
    _DATA["d"] = load_prepared(data)
    if tuned:
        engine.tune_allocator()


def _job(variant, name, bs, opt_name, dev, steps, loader, precision, compile_mode):
    device = torch.device(dev)
    if variant == "reference":
        return reference_ips(name, bs, opt_name, device, _DATA["d"], steps)
    return ours_ips(name, bs, opt_name, device, _DATA["d"], steps, loader, precision,
                    compile_mode)


def main(data, model_names, batches, optimizers, devices, steps, repeats, out_dir,
         precision="fp32", compile_mode=None):
    load_prepared(data)  # a missing or corrupt file fails here, before any child starts
    rows = []
    # the matmul rate first, on an idle machine: measured while the children start up, it
    # came out low enough to show over 100 % of it
    rates = {dev: matmul_rate(torch.device(dev)) for dev in devices}
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no fork of torch state
    with spawn.Pool(1, _worker_init, (data, False)) as ref_pool, \
            spawn.Pool(1, _worker_init, (data, True)) as our_pool:
        for dev in devices:
            rows += bench_device(dev, rates[dev], ref_pool, our_pool, model_names, batches,
                                 optimizers, steps, repeats, precision, compile_mode)
    write(rows, devices, steps, repeats, out_dir)
    return rows


def bench_device(dev, rate, ref_pool, our_pool, model_names, batches, optimizers, steps,
                 repeats, precision, compile_mode):
    loader = "resident" if dev == "cuda" else "dataloader"
    rows = []
    for name in model_names:
        gfl = models.gflops(name, "imagenet")
        for bs in batches:
            for opt_name in optimizers:
                ref, ours = [], []
                for _ in range(repeats):  # interleaved, so drift hits both alike
                    job = (name, bs, opt_name, dev, steps, loader, precision, compile_mode)
                    ref.append(ref_pool.apply(_job, ("reference",) + job))
                    ours.append(our_pool.apply(_job, ("ours",) + job))
                r, o = statistics.median(ref), statistics.median(ours)
                row = {"device": dev, "model": name, "batch": bs, "optimizer": opt_name,
                       "reference_ips": r, "ours_ips": o, "ratio": o / r,
                       "reference_runs": ref, "ours_runs": ours,
                       "ours_mfu": 3 * gfl * 1e9 * o / rate, "ours_loader": loader,
                       "ours_precision": precision, "ours_compile": compile_mode,
                       "matmul_gmacs": rate / 1e9}
                rows.append(row)
                print(f"{dev} {name} batch {bs} {opt_name}: reference {r:.0f} img/s, "
                      f"ours {o:.0f} img/s, {o / r:.2f}x, "
                      f"{100 * row['ours_mfu']:.1f}% of matmul rate", flush=True)
    return rows


def write(rows, devices, steps, repeats, out_dir):
    """bench.json (every run) and bench.md (medians) under out_dir."""
    machine = describe_machine(devices)
    write_json({"machine": machine, "steps": steps, "repeats": repeats, "rows": rows},
               os.path.join(out_dir, "bench.json"))
    md = [f"Machine: {machine}; {steps} timed steps after {WARMUP} warm-up, median of "
          f"{repeats} interleaved repeats, each variant in its own process.", "",
          "| device | model | batch | optimizer | ours runs with | reference img/s | ours img/s | "
          "ratio | ours model FLOP/s vs matmul |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        how = f"{r['ours_loader']}, {r['ours_precision']}" + (
            f", compile {r['ours_compile']}" if r["ours_compile"] else "")
        md.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['optimizer']} | {how} | "
                  f"{r['reference_ips']:.0f} | {r['ours_ips']:.0f} | {r['ratio']:.2f}x | "
                  f"{100 * r['ours_mfu']:.1f}% |")
    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(md) + "\n")
    replace_atomic(write_md, os.path.join(out_dir, "bench.md"))
    print("\n".join(md))


def isa_description():
    """The instruction sets the CPU kernels run with: ATen's (ATEN_CPU_CAPABILITY), oneDNN's
    (convolutions, bf16 matmul; ONEDNN_MAX_CPU_ISA) and MKL's (torch's fp32 matmul;
    MKL_ENABLE_INSTRUCTIONS). Emulating an older CPU takes all three: MKL ignores the first
    two (measured: 48 GMAC/s one-thread 512x512 matmul under ONEDNN_MAX_CPU_ISA=AVX2
    ATEN_CPU_CAPABILITY=avx2 on the AVX-512 machine, 29 with MKL_ENABLE_INSTRUCTIONS=AVX2)."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
    text = (f"torch ISA {torch.backends.cpu.get_cpu_capability()}, oneDNN max ISA "
            f"{onednn or 'default'}, MKL instructions {mkl or 'default'}")
    if onednn and not mkl:
        text += (" (MKL, torch's fp32 matmul, still runs the CPU's best ISA: set "
                 "MKL_ENABLE_INSTRUCTIONS too to emulate an older CPU)")
    return text


def describe_machine(devices):
    parts = [engine.device_name(torch.device("cpu"))]
    if "cuda" in devices:
        parts.append(torch.cuda.get_device_name())
    return ", ".join(parts) + f"; {isa_description()}; torch {torch.__version__}, " \
        f"{torch.get_num_threads()} threads"


def _cli(argv):
    ap = Parser(prog="python -m ablation.bench",
                description="Training throughput of the study's loop vs the train stage's, "
                            "side by side in one run; writes bench.json and bench.md.")
    ap.add_argument("--data", default="data/prepared/mnist.npz",
                    help="prepared dataset to train on (default: %(default)s)")
    ap.add_argument("--models", nargs="+", default=list(models.MODELS),
                    choices=list(models.MODELS), metavar="MODEL",
                    help="architectures (default: all: %(default)s)")
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 32],
                    help="batch sizes (default: %(default)s)")
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sgd"],
                    choices=list(models.OPTIMIZERS), metavar="OPTIMIZER",
                    help="optimizers (default: %(default)s)")
    ap.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], metavar="DEVICE",
                    default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
                    help="devices (default: cpu, and cuda where there is one)")
    ap.add_argument("--steps", type=int, default=20,
                    help="timed steps per measurement, after %d warm-up steps "
                         "(default: %%(default)s)" % WARMUP)
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved repeats; the median is reported (default: %(default)s)")
    ap.add_argument("--out", default="bench/out", help="output directory (default: %(default)s)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                    help="ours: train.precision (auto: bf16 on a CPU with native bf16); the "
                         "reference is always fp32 (default: %(default)s)")
    ap.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                    help="ours: torch.compile mode (reduce-overhead/max-autotune: CUDA graphs)")
    a = ap.parse_args(argv)
    main(a.data, a.models, a.batches, a.optimizers, a.devices, a.steps, a.repeats, a.out,
         a.precision, a.compile)


if __name__ == "__main__":
    run(_cli)
