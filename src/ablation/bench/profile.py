"""Profile: where one training step of the train stage's loop spends its time on the CPU.

    python -m ablation.bench.profile [--models resnet18] [--batches 16] [--optimizer adam]
                               [--steps 30] [--reference] [--out bench/out/profile.md]

Builds the model, optimizer and step exactly as the train stage does with its default switches
(ablation.bench.our_setup: measured small-map paths, fused optimizer, tuned allocator), warms
up, then
  1. times each phase of `steps` steps with a wall clock (input, forward + loss, zero_grad,
     backward, optimizer step): the median per phase, no profiler attached;
  2. runs `steps` more under torch.profiler and sums each operator's self CPU time into
     categories (convolution, matmul, BatchNorm, the optimizer, fill/copy, ...).
With --reference, the same for the study's loop (`make bench`'s reference: per-sample PIL
transforms in a stock DataLoader, the stock model, torch's default optimizer; in a spawned
process without the allocator tuning, as `make bench` runs it), then both side by side per
phase: which phases the speed-up comes from, and what is left to gain.
Emulate an older ISA with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 (the header names the ISAs the kernels run). Writes the markdown
tables to --out and prints them.
"""
import contextlib
import multiprocessing
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ablation.bench.loop import _DATA as bench_data
from ablation.bench.loop import _worker_init, isa_description, our_setup, reference_setup
from ablation.core.cli import Parser, UserError, run
from ablation.core.io import replace_atomic
from ablation.training import engine, models, smallmaps
from ablation.training.datasets import load_prepared

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


def phase_times(model, opt, next_batch, amp, steps):
    """Median wall ms per phase over `steps` steps, and the median and mean of the whole steps
    (a step whose phases are slow at different times, e.g. page faults of a stock allocator,
    makes the sum of the phase medians lower than the whole step); `next_batch(i)` returns step
    i's normalised input and labels (its time is the input phase)."""
    per = {p: [] for p in PHASES}
    whole = []
    model.train()
    for i in range(WARMUP + steps):
        t = [time.perf_counter()]
        xn, yb = next_batch(i)
        t.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(xn), yb)
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
            whole.append(1e3 * (t[-1] - t[0]))
    return ({p: statistics.median(v) for p, v in per.items()},
            {"median": statistics.median(whole), "mean": statistics.fmean(whole)})


def op_times(model, opt, next_batch, amp, steps):
    """{category: self CPU ms per step} and the top operators, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            xn, yb = next_batch(i)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(xn), yb)
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
    """The train stage's step: whole uint8 batches normalised in bulk."""
    device = torch.device("cpu")
    _, step_model, opt, ctx = our_setup(name, bs, opt_name, device, d, precision=precision)
    n = (WARMUP + steps) * bs
    x = torch.from_numpy(d["train_images"][:n])
    y = torch.from_numpy(d["train_labels"][:n].astype(np.int64))

    def next_batch(i):
        i %= WARMUP + steps
        return engine.normalise(x[i * bs:(i + 1) * bs], ctx), y[i * bs:(i + 1) * bs]
    phases, whole = phase_times(step_model, opt, next_batch, ctx.amp, steps)
    cats, ops = op_times(step_model, opt, next_batch, ctx.amp, steps)
    return phases, whole, cats, ops


def profile_reference(name, bs, opt_name, steps):
    """The study's step (ablation.bench's reference), run as `make bench` runs it: in a
    spawned process without the allocator tuning (bench._worker_init(data, False) loaded the
    data). The input phase is the DataLoader's per-sample PIL transforms and collation."""
    d = bench_data["d"]
    n = (WARMUP + steps) * bs
    loader, model, opt = reference_setup(name, bs, opt_name, torch.device("cpu"), d, n)
    batches = iter(())

    def next_batch(i):
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)
    phases, whole = phase_times(model, opt, next_batch, False, steps)
    cats, ops = op_times(model, opt, next_batch, False, steps)
    return phases, whole, cats, ops


def side_by_side(name, bs, opt_name, precision, ref, ours):
    """Reference vs ours per phase and per operator category: where the speed-up comes from."""
    (rp, rw, rc, _), (op, ow, oc, _) = ref, ours
    rt, ot = sum(rp.values()), sum(op.values())
    md = [f"### {name}, batch {bs}, {opt_name}: the study's step (fp32) against ours "
          f"({precision})", "",
          f"Whole steps, median: reference {rw['median']:.1f} ms, ours {ow['median']:.1f} ms, "
          f"**{rw['median'] / ow['median']:.2f}x** (mean: {rw['mean']:.1f} against "
          f"{ow['mean']:.1f} ms, {rw['mean'] / ow['mean']:.2f}x). Sum of the per-phase medians: "
          f"reference {rt:.1f} ms, ours {ot:.1f} ms. \"saved\" is the reference's ms minus "
          "ours; its share is of all the time saved (shown where ours is at least 5 % faster).",
          "", "| phase (wall clock, median) | reference ms | ours ms | ratio | saved ms | share "
          "of saving |", "|---|---|---|---|---|---|"]

    def share(p):
        return f"{100 * (rp[p] - op[p]) / (rt - ot):.0f} %" if rt > 1.05 * ot else "—"
    md += [f"| {p} | {rp[p]:.2f} | {op[p]:.2f} | {rp[p] / max(op[p], 1e-6):.2f}x | "
           f"{rp[p] - op[p]:.2f} | {share(p)} |" for p in PHASES]
    md += ["", "| operator category (profiler, self CPU) | reference ms | ours ms |",
           "|---|---|---|"]
    for c in sorted(set(rc) | set(oc), key=lambda c: -rc.get(c, 0.0)):
        md.append(f"| {c} | {rc.get(c, 0.0):.2f} | {oc.get(c, 0.0):.2f} |")
    return md + [""]


def table(name, bs, opt_name, precision, phases, whole, cats, ops, top):
    total = sum(phases.values())
    md = [f"### {name}, batch {bs}, {opt_name}, {precision}: {whole['median']:.1f} ms per step "
          f"({1e3 * bs / whole['median']:.0f} img/s; mean {whole['mean']:.1f} ms; the phase "
          f"medians add up to {total:.1f} ms)", "",
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


def main(data, model_names, batches, opt_name, steps, precision, top, out, reference=False):
    d = load_prepared(data)
    need = (WARMUP + steps) * max(batches)
    if len(d["train_labels"]) < need:
        raise UserError(f"{data}: {len(d['train_labels'])} training images, fewer than the "
                        f"{need} that {WARMUP} warm-up + {steps} steps of batch {max(batches)} "
                        f"take: lower --steps or --batches")
    engine.tune_allocator()  # as the train stage runs
    md = [f"## Step profile: {smallmaps.cpu_name()}, {isa_description()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", ""]
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, untuned allocator
    with contextlib.ExitStack() as stack:
        ref_pool = stack.enter_context(spawn.Pool(1, _worker_init, (data, False))) \
            if reference else None
        for name in model_names:
            for bs in batches:
                ours = profile_one(name, bs, opt_name, d, steps, precision)
                md += table(name, bs, opt_name, precision, *ours, top)
                if reference:
                    ref = ref_pool.apply(profile_reference, (name, bs, opt_name, steps))
                    md += table(name, bs, opt_name, "fp32, the study's loop (reference)", *ref,
                                top)
                    md += side_by_side(name, bs, opt_name, precision, ref, ours)
    text = "\n".join(md)
    if out:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text + "\n")
        replace_atomic(write, out)
    print(text)


def _cli(argv):
    ap = Parser(prog="python -m ablation.bench.profile",
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
    ap.add_argument("--reference", action="store_true",
                    help="also profile the study's loop (make bench's reference) and compare "
                         "the two phase by phase")
    ap.add_argument("--out", default="bench/out/profile.md",
                    help="markdown file to write; '' for none (default: %(default)s)")
    a = ap.parse_args(argv)
    if a.steps < 1 or min(a.batches) < 2:
        ap.error("--steps must be >= 1 and every batch >= 2")
    main(a.data, a.models, a.batches, a.optimizer, a.steps, a.precision, a.top, a.out,
         a.reference)


if __name__ == "__main__":
    run(_cli)
