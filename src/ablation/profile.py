"""Profile: where one training step of the train stage's loop spends its time on the CPU.

    python -m ablation.profile [--models resnet18] [--batches 16] [--optimizer adam]
                               [--steps 30] [--out bench/out/profile.md]

Builds the model, optimizer and step exactly as the train stage does with its default switches
(ablation.bench.our_setup: measured small-map paths, fused optimizer, tuned allocator), warms
up, then
  1. times each phase of `steps` steps with a wall clock (input, forward + loss, zero_grad,
     backward, optimizer step): the median per phase, no profiler attached;
  2. runs `steps` more under torch.profiler and sums each operator's self CPU time into
     categories (convolution, matmul, BatchNorm, the optimizer, fill/copy, ...).
Emulate an older ISA with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (the header names
the ISA torch runs). Writes the markdown tables to --out and prints them.
"""
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import engine, models, smallmaps
from .bench import our_setup
from .cli import Parser, UserError, run
from .datasets import load_prepared
from .io import replace_atomic

WARMUP = 5
PHASES = ("input", "forward", "zero_grad", "backward", "optimizer")
# operator name fragment -> category, first match wins (torch's aten:: names, lower case)
CATEGORIES = (
    ("optimizer", ("adam", "sgd", "_foreach")),
    ("batch norm", ("batch_norm",)),
    ("convolution (oneDNN)", ("convolution", "mkldnn_conv", "conv2d", "conv_depthwise")),
    ("matmul (small-map path, fc)", ("aten::mm", "aten::addmm", "aten::bmm", "matmul",
                                     "linear")),
    ("unfold / col2im", ("im2col", "col2im", "unfold")),
    ("fill / zero / copy / slice grads", ("fill_", "zero_", "zeros", "copy_", "slice_backward",
                                          "clone", "contiguous", "empty", "cat")),
    ("relu / add / pool", ("relu", "threshold", "add", "max_pool", "pool")),
    ("loss, argmax, normalise", ("cross_entropy", "log_softmax", "nll_loss", "argmax", "div",
                                 "sub", "mul", "sum", "eq", "_to_copy", "to")),
)


def category(op):
    op = op.lower()
    return next((c for c, frags in CATEGORIES if any(f in op for f in frags)), "other")


def phase_times(step_model, opt, x, y, ctx, bs, steps):
    """Median wall ms per phase over `steps` steps (batch i: images i*bs .. (i+1)*bs)."""
    per = {p: [] for p in PHASES}
    step_model.train()
    for i in range(WARMUP + steps):
        t = [time.perf_counter()]
        xb, yb = x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]
        xn = engine.normalise(xb, ctx)
        t.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ctx.amp):
            loss = F.cross_entropy(step_model(xn), yb)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if i >= WARMUP:
            for p, a, b in zip(PHASES, t, t[1:]):
                per[p].append(1e3 * (b - a))
    return {p: statistics.median(v) for p, v in per.items()}


def op_times(step_model, opt, x, y, ctx, bs, steps):
    """{category: self CPU ms per step} and the top operators, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            xb, yb = x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ctx.amp):
                loss = F.cross_entropy(step_model(engine.normalise(xb, ctx)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    cats, ops = {}, []
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / steps
        if ms <= 0:
            continue
        cats[category(ev.key)] = cats.get(category(ev.key), 0.0) + ms
        ops.append((ms, ev.key, ev.count // steps))
    return cats, sorted(ops, reverse=True)


def profile_one(name, bs, opt_name, d, steps, precision):
    device = torch.device("cpu")
    _, step_model, opt, ctx = our_setup(name, bs, opt_name, device, d, precision=precision)
    n = (WARMUP + steps) * bs
    x = torch.from_numpy(d["train_images"][:n])
    y = torch.from_numpy(d["train_labels"][:n].astype(np.int64))
    phases = phase_times(step_model, opt, x, y, ctx, bs, steps)
    cats, ops = op_times(step_model, opt, x, y, ctx, bs, steps)
    return phases, cats, ops


def table(name, bs, opt_name, precision, phases, cats, ops, top):
    total = sum(phases.values())
    md = [f"### {name}, batch {bs}, {opt_name}, {precision}: {total:.1f} ms per step "
          f"({1e3 * bs / total:.0f} img/s)", "",
          "| phase (wall clock, median) | ms/step | share |", "|---|---|---|"]
    md += [f"| {p} | {ms:.2f} | {100 * ms / total:.1f} % |" for p, ms in phases.items()]
    prof_total = sum(cats.values())
    md += ["", f"| operator category (profiler, self CPU; {prof_total:.1f} ms/step) | ms/step "
               "| share |", "|---|---|---|"]
    md += [f"| {c} | {ms:.2f} | {100 * ms / prof_total:.1f} % |"
           for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])]
    md += ["", "| top operators | ms/step | calls/step |", "|---|---|---|"]
    md += [f"| `{op}` | {ms:.2f} | {calls} |" for ms, op, calls in ops[:top]]
    return md + [""]


def main(data, model_names, batches, opt_name, steps, precision, top, out):
    d = load_prepared(data)
    need = (WARMUP + steps) * max(batches)
    if len(d["train_labels"]) < need:
        raise UserError(f"{data}: {len(d['train_labels'])} training images, fewer than the "
                        f"{need} that {WARMUP} warm-up + {steps} steps of batch {max(batches)} "
                        f"take: lower --steps or --batches")
    engine.tune_allocator()  # as the train stage runs
    isa = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "default")
    md = [f"## Step profile: {smallmaps.cpu_name()}, torch ISA {isa}, oneDNN max ISA "
          f"{onednn}, torch {torch.__version__}, {torch.get_num_threads()} threads", ""]
    for name in model_names:
        for bs in batches:
            phases, cats, ops = profile_one(name, bs, opt_name, d, steps, precision)
            md += table(name, bs, opt_name, precision, phases, cats, ops, top)
    text = "\n".join(md)
    if out:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text + "\n")
        replace_atomic(write, out)
    print(text)


def _cli(argv):
    ap = Parser(prog="python -m ablation.profile",
                description="Where a CPU training step of the train stage spends its time: "
                            "wall clock per phase and profiler time per operator category.")
    ap.add_argument("--data", default="data/prepared/mnist.npz",
                    help="prepared dataset to train on (default: %(default)s)")
    ap.add_argument("--models", nargs="+", default=["resnet18"], choices=list(models.MODELS),
                    metavar="MODEL", help="architectures (default: %(default)s)")
    ap.add_argument("--batches", nargs="+", type=int, default=[16],
                    help="batch sizes (default: %(default)s)")
    ap.add_argument("--optimizer", default="adam", choices=list(models.OPTIMIZERS),
                    help="optimizer (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=30,
                    help="steps per measurement, after %d warm-up steps (default: %%(default)s)"
                         % WARMUP)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="train.precision (default: %(default)s)")
    ap.add_argument("--top", type=int, default=12,
                    help="operators listed by self time (default: %(default)s)")
    ap.add_argument("--out", default="bench/out/profile.md",
                    help="markdown file to write; '' for none (default: %(default)s)")
    a = ap.parse_args(argv)
    if a.steps < 1 or min(a.batches) < 2:
        ap.error("--steps must be >= 1 and every batch >= 2")
    main(a.data, a.models, a.batches, a.optimizer, a.steps, a.precision, a.top, a.out)


if __name__ == "__main__":
    run(_cli)
