"""Horizontal fusion (HFTA, MLSys 2021): N train runs of one architecture and batch size as one
computation, so one kernel launch does N runs' work on a GPU a batch-16 ResNet step leaves
idle. `train_pack([job, ...])`, each job train.main's arguments as a dict (gpu/launch.py).

The runs' channels lie side by side: convolutions become grouped convolutions (groups=N),
BatchNorm runs per channel over the concatenated channels, the last Linear layer a batched
matmul. Each run keeps its parameters as the leaves of its own ordinary model, concatenated
into the fused weights in every forward (one cat per layer, whatever N); the fused weights'
gradients go back to each run's .grad as views (no copy per run), each run keeps its own torch
optimizer (type, lr, state), and each run's state_dict is what the run alone would have. The
loss is the sum of the runs' mean losses, so each run's gradient is its own. A pack may differ
in data, seed, optimizer, lr, momentum, weight_decay, pin_memory; nothing else.
"""
import contextlib
import dataclasses
import math
import os
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision

from ablation.core.cli import UserError, progress_bar
from ablation.core.io import OutputLock, check_outputs, save_torch, write_metrics
from ablation.core.outputs import record_path
from ablation.stages import train
from ablation.training import engine
from ablation.training.datasets import load_prepared
from ablation.training.live import finish_live, log_epoch, open_live
from ablation.training.params import METRICS

VARY = ("models", "seed", "optimizer", "lr", "momentum", "weight_decay", "pin_memory")
BLOCKS = {torchvision.models.resnet.BasicBlock: 2, torchvision.models.resnet.Bottleneck: 3}


def _join(ps, leaves, stack=False):
    """The runs' parameters `ps` as one tensor (cat, or stack). Given `leaves` (step()), a fresh
    leaf whose gradient goes back to each run as views, no copy per run; else autograd's cat."""
    w = torch.stack(ps) if stack else torch.cat(ps)
    if leaves is None or not ps[0].requires_grad or not torch.is_grad_enabled():
        return w
    w = w.detach().requires_grad_()
    leaves.append((w, ps, stack))
    return w


def _conv(convs, x, t):
    """The runs' convolutions as one grouped convolution over their concatenated channels."""
    c = convs[0]
    b = _join([m.bias for m in convs], t[0]) if c.bias is not None else None
    return F.conv2d(x, _join([m.weight for m in convs], t[0]), b, c.stride, c.padding,
                    c.dilation, c.groups * len(convs))


def _bn(bns, x, t):
    """The runs' BatchNorms as one per-channel BatchNorm; in training the updated running
    statistics are queued in t[1] to go back into each run's own buffers."""
    b = bns[0]
    mean = torch.cat([m.running_mean for m in bns])
    var = torch.cat([m.running_var for m in bns])
    y = F.batch_norm(x, mean, var, _join([m.weight for m in bns], t[0]),
                     _join([m.bias for m in bns], t[0]), b.training, b.momentum, b.eps)
    if b.training:
        t[1].extend(zip(bns, mean.split(b.num_features), var.split(b.num_features)))
    return y


def _block(blocks, x, t):
    """One BasicBlock or Bottleneck of every run, as torchvision computes it."""
    n = BLOCKS[type(blocks[0])]
    out = x
    for k in range(1, n + 1):
        out = _conv([getattr(b, f"conv{k}") for b in blocks], out, t)
        out = _bn([getattr(b, f"bn{k}") for b in blocks], out, t)
        out = F.relu(out) if k < n else out
    if blocks[0].downsample is not None:
        x = _conv([b.downsample[0] for b in blocks], x, t)
        x = _bn([b.downsample[1] for b in blocks], x, t)
    return F.relu(out + x)


def _linear(fcs, x, t):
    """The runs' Linear layers as one batched matmul: (B, N*F) -> (N, B, classes)."""
    x = x.view(x.shape[0], len(fcs), -1).transpose(0, 1)
    w = _join([m.weight for m in fcs], t[0], stack=True).transpose(1, 2)
    return torch.baddbmm(_join([m.bias for m in fcs], t[0], stack=True).unsqueeze(1), x, w)


def _hand_back(leaves, loss):
    """Backward to the fused leaves; each run's parameters get their slices of the gradient:
    views where the strides are the parameter's (fused optimizers read both flat), else copies
    laid out as the parameter, as autograd's AccumulateGrad makes them."""
    grads = torch.autograd.grad(loss, [w for w, _, _ in leaves])
    for (_, ps, stacked), g in zip(leaves, grads):
        for p, gp in zip(ps, g.unbind(0) if stacked else g.split([p.shape[0] for p in ps])):
            p.grad = gp if gp.stride() == p.stride() else torch.empty_like(p).copy_(gp)


def _write_back(pending):
    """Each run's BatchNorm buffers as nn.BatchNorm2d leaves them: the running statistics
    updated, num_batches_tracked counted (a few multi-tensor launches, not one per run)."""
    if not pending:
        return
    mods = [p[0] for p in pending]
    with torch.no_grad():
        torch._foreach_copy_([m.running_mean for m in mods], [p[1] for p in pending])
        torch._foreach_copy_([m.running_var for m in mods], [p[2] for p in pending])
        torch._foreach_add_([m.num_batches_tracked for m in mods], 1)


def check_fusable(models):
    """UserError unless `models` are torchvision ResNets of one shape, as forward() needs."""
    if len({tuple((k, v.shape) for k, v in m.state_dict().items()) for m in models}) != 1:
        raise UserError("fused: the models differ in architecture or shape")
    m, mods = models[0], list(models[0].modules())
    if not isinstance(m, torchvision.models.ResNet) \
            or any(type(b) not in BLOCKS for n in range(1, 5) for b in getattr(m, f"layer{n}")) \
            or any(c.padding_mode != "zeros" for c in mods if isinstance(c, torch.nn.Conv2d)) \
            or any(b.momentum is None or not b.track_running_stats for b in mods
                   if isinstance(b, torch.nn.BatchNorm2d)):
        raise UserError(f"fused: {type(m).__name__} is not a torchvision ResNet of "
                        f"BasicBlocks or Bottlenecks with plain convolutions and BatchNorms")


def forward(models, x, leaves=None):
    """Logits (N, B, classes) of N same-shaped ResNets: `x` (B, N*C, H, W) holds run i's
    batch in channels i*C..(i+1)*C-1. Train or eval mode as each model is set (all alike).
    `leaves`: a list to collect the fused leaves step() hands gradients back from."""
    t = (leaves, [])  # (fused leaves, BatchNorm statistics to write back)
    m = models[0]
    x = _conv([r.conv1 for r in models], x, t)
    x = F.relu(_bn([r.bn1 for r in models], x, t))
    x = m.maxpool(x)  # max-pool, pooling and ReLU act per channel: the fused tensor as it is
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for j in range(len(getattr(m, name))):
            x = _block([getattr(r, name)[j] for r in models], x, t)
    out = _linear([r.fc for r in models], torch.flatten(m.avgpool(x), 1), t)
    _write_back(t[1])
    return out


def inputs(xbs, mean, std, channels_last=False):
    """uint8 batches (B, H, W), one per run -> the fused input (B, N, H, W), each run's images
    standardised with its own training mean and std ((N,) tensors) as engine.normalise does."""
    x = torch.stack(xbs, 1).float().div_(255.0).sub_(mean.view(1, -1, 1, 1))
    x = x.div_(std.view(1, -1, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def step(models, opts, x, ys, amp=False):
    """One training step of N runs: fused forward, loss = sum of each run's mean cross-entropy
    (so each run's gradient is exactly its own), each run's own optimizer step. `ys` (N, B).
    Returns (each run's loss (N,), logits (N, B, classes)), detached."""
    leaves = []
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = forward(models, x, leaves)
        n, b, k = out.shape
        losses = F.cross_entropy(out.reshape(n * b, k), ys.reshape(-1),
                                 reduction="none").view(n, b).mean(1)
    _hand_back(leaves, losses.sum())  # sets every run's .grad: no zero_grad needed
    for opt in opts:
        opt.step()
    return losses.detach(), out.detach()


# ---- the pack: jobs, data, the epoch loop, the outputs -----------------------------------------

class Job(NamedTuple):
    """One run of a pack: train.main's arguments (no checkpoint: a pack runs start to end)."""
    cfg: dict  # the validated `train` section
    data_cfg: dict  # the validated `data` section
    data_path: str
    model_name: str
    metrics_path: str
    model_path: str
    ckpt_path: str | None = None
    live_dir: str | None = None


@dataclasses.dataclass
class Run:
    """One run's data, model, optimizer and what it has recorded so far."""
    job: Job
    d: dict  # what summarise reads of the prepared file: one image, the class names
    train: tuple  # (images, labels) on the device
    test: tuple
    ctx: engine.RunContext
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sw: dict  # the resolved switches, as recorded
    history: list = dataclasses.field(default_factory=list)
    live: object = None
    pred: torch.Tensor | None = None


def _job(j):
    try:
        job = Job(**j)
    except TypeError as e:
        raise UserError(f"fused: bad job {sorted(j)}: {e} (keys: {', '.join(Job._fields)})")
    if job.ckpt_path is not None:
        raise UserError(f"fused: {job.metrics_path}: a fused pack does not checkpoint "
                        f"(ckpt_path must be None)")
    return job


def check_pack(jobs):
    """UserError naming what differs unless the jobs can train as one fused pack."""
    if not jobs:
        raise UserError("fused: no jobs")
    for key in ("model", *jobs[0].cfg):
        vals = [j.model_name if key == "model" else j.cfg[key] for j in jobs]
        if key not in VARY and any(v != vals[0] for v in vals):
            raise UserError(f"fused: the jobs differ in {'train.' * (key != 'model')}{key} "
                            f"({', '.join(map(str, vals))}); a pack shares everything but data, "
                            + ", ".join(VARY[1:]))
    cfg = jobs[0].cfg
    if cfg["loader"] != "resident":
        raise UserError(f"fused: train.loader = {cfg['loader']}: a fused pack needs resident "
                        f"(every run's images on the device, batches sliced there)")
    if cfg["compile"]:
        raise UserError("fused: train.compile = true: a fused pack runs uncompiled")
    outs = [p for j in jobs for p in (j.metrics_path, j.model_path, j.live_dir) if p]
    if len({os.path.abspath(p) for p in outs}) < len(outs):
        raise UserError("fused: two jobs write the same output file or directory")


def _switches(cfg, device, n):
    """What a fused run records: the resolved switches with small-map paths off (a CPU-only
    optimisation the grouped convolutions do not take), no compile, and how it was packed:
    the pack's runs, or more where several packs share the GPU (ABLATION_GPU_SHARED_BY)."""
    sw = engine.resolve_switches(cfg, device)
    env = os.environ.get("ABLATION_GPU_SHARED_BY", "")
    shared = max(n, int(env)) if env.isdigit() else n
    return {**sw, "small_maps": False, "compile_mode": None, "small_map_paths": None,
            "pin_memory_effective": False, "packing": "fused", "gpu_shared_by": shared}


def _load(job, device):
    """The job's data: (slim prepared dict, train tensors, test tensors) on `device`."""
    d = load_prepared(job.data_path)
    tr, te = train.select(d, job.data_cfg, "resident", device)
    # summarise reads the image shape and the classes; the full arrays need not stay in memory
    slim = {"train_images": d["train_images"][:1].copy(), "classes": d["classes"],
            "mean": d["mean"], "std": d["std"]}
    return slim, tr, te


def _setup(job, data, device, n):
    """A Run built exactly as the train stage builds it alone (its own seed, model, optimizer)."""
    d, tr, te = data
    sw = _switches(job.cfg, device, n)
    ctx = engine.RunContext(device, float(d["mean"]), float(d["std"]), sw["channels_last"],
                            sw["precision"] == "bf16")
    model, _, opt, _ = engine.setup_model(job.model_name, job.cfg, device, sw,
                                          len(d["classes"]), (1, *d["train_images"].shape[1:]))
    return Run(job, d, tr, te, ctx, model, opt, sw, live=open_live(job.live_dir, []))


def _check_data(jobs, data):
    """The runs' images must have one shape and their labels one set of class counts."""
    kinds = [(tuple(d["train_images"].shape[1:]), len(d["classes"])) for d, _, _ in data]
    if len(set(kinds)) > 1:
        raise UserError("fused: the jobs' data differ in image shape or number of classes (" +
                        ", ".join(f"{j.data_path}: {s[0]}x{s[1]}, {c} classes"
                                  for j, (s, c) in zip(jobs, kinds)) + ")")


def _by_size(batches):
    """Run indices grouped by batch size: only equal batches fuse (a smaller last batch, or
    runs whose datasets differ in size, step in their own group)."""
    groups = {}
    for i, (_, y) in batches.items():
        groups.setdefault(len(y), []).append(i)
    return list(groups.values())


def _step_group(runs, idx, batches, sums, consts):
    """One fused step of the runs `idx` (equal batches); adds to their loss and hit sums."""
    rs = [runs[i] for i in idx]
    if tuple(idx) not in consts:  # a host-to-device copy waits for the GPU: once per group
        dev = sums[0].device
        consts[tuple(idx)] = (torch.tensor([r.ctx.mean for r in rs], device=dev),
                              torch.tensor([r.ctx.std for r in rs], device=dev),
                              torch.tensor(idx, device=dev))
    mean, std, at = consts[tuple(idx)]
    x = inputs([batches[i][0] for i in idx], mean, std, rs[0].ctx.channels_last)
    ys = torch.stack([batches[i][1] for i in idx])
    losses, out = step([r.model for r in rs], [r.opt for r in rs], x, ys, rs[0].ctx.amp)
    sums[0].index_add_(0, at, losses.float() * ys.shape[1])
    sums[1].index_add_(0, at, (out.argmax(2) == ys).sum(1))


def train_epoch(runs, epoch, log=lambda n: None):
    """One epoch of every run in `runs`, fused, each on its own shuffle (engine.epoch_batches).
    A run whose loss is not finite at a check (every engine.CHECK_EVERY steps, as alone) stops.
    Returns ([(mean loss, accuracy %, data wait s, finite) per run], the pack's loop time s)."""
    device, n = runs[0].ctx.device, len(runs)
    for r in runs:
        r.model.train()
    its = [engine.epoch_batches(*r.train, r.job.cfg, device, epoch, False) for r in runs]
    sums = (torch.zeros(n, device=device), torch.zeros(n, device=device, dtype=torch.long))
    seen, wait, live, count, consts = [0] * n, [0.0] * n, list(range(n)), 0, {}
    engine.sync(device)
    t0 = time.perf_counter()
    while live:
        batches = {}
        for i in live:
            tw = time.perf_counter()
            b = next(its[i], None)
            wait[i] += time.perf_counter() - tw
            if b is not None:
                batches[i] = b
        live = list(batches)
        for idx in _by_size(batches):
            _step_group(runs, idx, batches, sums, consts)
        for i in live:
            seen[i] += len(batches[i][1])
        count += 1
        if live and count % engine.CHECK_EVERY == 0:
            ok = torch.isfinite(sums[0]).tolist()
            live = [i for i in live if ok[i]]
        log(sum(len(y) for _, y in batches.values()))
    engine.sync(device)
    elapsed = time.perf_counter() - t0
    ls, hits = sums[0].tolist(), sums[1].tolist()
    return [(ls[i] / max(seen[i], 1), 100.0 * hits[i] / max(seen[i], 1), wait[i],
             math.isfinite(ls[i])) for i in range(n)], elapsed


def _end_epoch(r, res, elapsed, log):
    """Evaluate the run alone (engine.evaluate) unless it diverged; record the epoch."""
    loss, acc, wait, finite = res
    test_acc, r.pred, eval_s = None, None, 0.0
    if finite:
        t0 = time.perf_counter()
        test_acc, r.pred = engine.evaluate(r.model, *r.test, r.ctx, log)
        engine.sync(r.ctx.device)
        eval_s = time.perf_counter() - t0
    r.history.append({"epoch": len(r.history) + 1, "train_loss": loss if finite else float("nan"),
                      "train_acc": acc, "test_acc": test_acc, "epoch_time_s": elapsed,
                      "data_wait_s": wait, "eval_time_s": eval_s})
    print(f"{r.job.metrics_path}: ", end="")
    train.print_epoch(r.history[-1], r.job.cfg["epochs"], len(r.train[1]))
    if r.live:
        log_epoch(r.live, r.history[-1])


def _finish(r, device):
    """Write what train.main writes for the run; return its metrics."""
    job = r.job
    metrics = train.summarise(r.history, job.cfg, len(r.train[1]), job.model_name, r.model,
                              r.d, r.sw, device, n_test=len(r.test[1]))
    finish_live(r.live, job.live_dir, r.pred, r.test[1])
    save_torch({"model": job.model_name, "stem": job.cfg["stem"],
                "state_dict": r.model.state_dict(),
                "params": {"train": job.cfg, "data": job.data_cfg}, "metrics": metrics,
                "classes": [str(c) for c in r.d["classes"]], "mean": r.ctx.mean,
                "std": r.ctx.std}, job.model_path)
    write_metrics(metrics, METRICS["train"], job.metrics_path)
    state = f"DIVERGED at epoch {metrics['diverged_epoch']}" if metrics["diverged"] else \
        f"test accuracy {metrics['test_accuracy']:.2f}%"
    print(f"{job.metrics_path}: {state} (fused, {r.sw['gpu_shared_by']} runs)")
    return metrics


def train_pack(jobs, device=None, progress=False):
    """Train `jobs` (dicts of train.main's arguments) as one fused pack on `device` (default:
    their train.device); each run writes its own metrics, record and model file as train.main
    would. Returns [(metrics, history) per job]. Everything is checked before any work."""
    jobs = [_job(j) for j in jobs]
    check_pack(jobs)
    cfg, n = jobs[0].cfg, len(jobs)
    device = torch.device(device) if device is not None else engine.pick_device(cfg["device"])
    for j in jobs:
        check_outputs(j.metrics_path, record_path(j.metrics_path), j.model_path,
                      j.live_dir and os.path.join(j.live_dir, "metrics.json"))
    data = [_load(j, device) for j in jobs]
    _check_data(jobs, data)
    with contextlib.ExitStack() as locks:
        for j in jobs:
            locks.enter_context(OutputLock(j.metrics_path))
        if _switches(cfg, device, n)["malloc_tuning"]:
            engine.tune_allocator()
        runs = [_setup(j, dt, device, n) for j, dt in zip(jobs, data)]
        check_fusable([r.model for r in runs])
        for epoch in range(cfg["epochs"]):
            live = [r for r in runs if not r.history or r.history[-1]["test_acc"] is not None]
            if not live:
                break
            bar = progress_bar(sum(len(r.train[1]) + len(r.test[1]) for r in live),
                                      f"fused x{len(live)} epoch {epoch + 1}/{cfg['epochs']}",
                                      progress)
            results, elapsed = train_epoch(live, epoch, bar.update)
            for r, res in zip(live, results):
                _end_epoch(r, res, elapsed, bar.update)
            bar.close()
        return [(_finish(r, device), r.history) for r in runs]
