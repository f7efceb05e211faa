"""A CPU fast path for the tiny feature maps of ResNets on 28x28 images, chosen per layer by
measuring it.

At 28x28 input with the ImageNet stem, layer3 runs on 2x2 and layer4 on 1x1 maps. oneDNN's
3x3 convolution takes a slow path there (about 35 ms forward+backward for one 512-channel conv
at batch 16, where the arithmetic needs about 1 ms). On such maps the convolution is exactly a
matrix multiply: on a 1x1 output only the taps that overlap the input contribute, and on up to
2x2 outputs an unfold + matrix multiply computes the same sums. `fast_small_maps` switches the
3x3 and 1x1 convolutions to that path; parameters and state_dict keys stay torchvision's.

Which layers gain depends on the CPU (oneDNN's kernels differ between AVX2 and AVX-512) and
the shapes, so `tune` measures each distinct layer shape once, forward + backward of both
paths, like cudnn.benchmark, and keeps the faster; the choices are cached per machine, torch
version, thread count and shape. Runs starting together take turns at the cache (an flock):
the first measures, the others read its choice, so one machine's runs of the same params take
the same paths, and compute the same numbers, whoever started them. Without tuning, the matmul
path runs where the output has at most SMALL_OUT pixels.
"""
import hashlib
import json
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_OUT = 4  # output pixels (Ho * Wo) at or below which the untuned matmul path runs
TUNE_REPS = 7  # timed forward+backward passes per path and shape (median), after 2 warm-up
MARGIN = 0.05  # the matmul path must be this much faster: near-ties keep the stock conv
VERSION = 2  # of the matmul path's implementation: measurements of another version are stale


def cache_dir():
    """$ABLATION_CACHE_DIR, else ~/.cache/ablation: measured choices outlive the run."""
    return os.environ.get("ABLATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ablation")


def _taps(size, k, stride, pad, out):
    """Range [lo, hi) of kernel taps along one axis that ever overlap the input."""
    used = [i for i in range(k) if any(0 <= o * stride - pad + i < size for o in range(out))]
    return used[0], used[-1] + 1


class _TapMatmul(torch.autograd.Function):
    """y = x_taps @ w_taps^T for a conv whose 1x1 output sees only some kernel taps (a 3x3
    conv on a 1x1 or 2x2 map), with the weight gradient written straight into the weight.

    Autograd's own slice backward allocates and zero-fills a full-size weight gradient every
    step (for 512x512x3x3 weights: 9.4 MB) and copies the used taps in. Here each conv keeps one
    full-size gradient buffer whose unused taps are zeroed once; backward writes only the used
    taps and hands the buffer over as `weight.grad` (or adds the taps into an existing
    `weight.grad`, the usual accumulation). The buffer is reused, so `weight.grad` must not be
    kept across a zero_grad(set_to_none=True) without copying it -- as with any optimizer loop.
    The gradient reaches the weight outside autograd's graph: `torch.autograd.grad` with
    respect to such a weight, and hooks on it, do not see it (the training loop uses neither);
    SmallMapConv2d takes this path only for a leaf Parameter weight.
    """

    @staticmethod
    def forward(ctx, xs, weight, conv, taps):
        i0, i1, j0, j1 = taps
        x2 = xs.reshape(xs.shape[0], -1)
        w2 = weight[:, :, i0:i1, j0:j1].reshape(weight.shape[0], -1)  # a gather: (out, in*taps)
        dev = xs.device.type
        if torch.is_autocast_enabled(dev) and x2.dtype != torch.float64:
            dt = torch.get_autocast_dtype(dev)  # compute (and keep for backward) as autocast
            x2, w2 = x2.to(dt), w2.to(dt)
        ctx.save_for_backward(x2, w2)
        ctx.conv, ctx.weight, ctx.taps = conv, weight, taps
        ctx.xshape, ctx.xdtype = xs.shape, xs.dtype
        return x2 @ w2.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x2, w2 = ctx.saved_tensors
        gy = gy.to(x2.dtype)
        gx = (gy @ w2).reshape(ctx.xshape).to(ctx.xdtype) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            _add_tap_grad(ctx.conv, ctx.weight, ctx.taps, gy.t() @ x2)
        return gx, None, None, None


def _add_tap_grad(conv, w, taps, g):
    """Put the (out, in*taps) gradient `g` of the taps `taps` into w.grad (w: the conv's leaf
    weight): added to an existing gradient, else written into the conv's reused buffer."""
    i0, i1, j0, j1 = taps
    g = g.reshape(w.shape[0], w.shape[1], i1 - i0, j1 - j0)
    if w.grad is not None:
        if w.grad is conv.__dict__.get("_tap_grad") and \
                conv.__dict__.get("_tap_grad_taps") != taps:
            conv._tap_grad_taps = None  # other taps now hold data: zero it all when reused
        w.grad[:, :, i0:i1, j0:j1] += g
        return
    buf = conv.__dict__.get("_tap_grad")
    if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device \
            or buf.stride() != w.stride():
        buf = conv._tap_grad = torch.zeros_like(w)
    elif conv.__dict__.get("_tap_grad_taps") != taps:  # other taps were written before
        buf.zero_()
    conv._tap_grad_taps = taps
    buf[:, :, i0:i1, j0:j1] = g
    w.grad = buf


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d whose forward is a matrix multiply where that was measured faster (`matmul`
    True), or, untuned (`matmul` None), where the output map is tiny."""
    matmul = None

    def forward(self, x):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        use = ho * wo <= SMALL_OUT if self.matmul is None else self.matmul
        if not use or self.groups != 1 or self.dilation != (1, 1) \
                or self.padding_mode != "zeros":
            return super().forward(x)
        if ho == 1 and wo == 1:  # only the overlapping taps see data: crop, then matmul
            i0, i1 = _taps(h, kh, sh, ph, 1)
            j0, j1 = _taps(w, kw, sw, pw, 1)
            xs = x[:, :, i0 - ph:i1 - ph, j0 - pw:j1 - pw]
            if (i1 - i0, j1 - j0) != (kh, kw) and not torch.compiler.is_compiling() \
                    and isinstance(self.weight, nn.Parameter) and self.weight.is_leaf:
                y = _TapMatmul.apply(xs, self.weight, self, (i0, i1, j0, j1))
            else:
                ws = self.weight[:, :, i0:i1, j0:j1].reshape(self.out_channels, -1)
                y = xs.reshape(n, -1) @ ws.t()
            y = y.reshape(n, self.out_channels, 1, 1)
        elif (kh, kw, ph, pw) == (1, 1, 0, 0):  # 1x1: pick the strided pixels, then matmul
            xs = x[:, :, ::sh, ::sw].permute(0, 2, 3, 1).reshape(n * ho * wo, c)
            y = (xs @ self.weight.reshape(self.out_channels, c).t()).reshape(
                n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        else:  # (O, C*kh*kw) weights times (N, C*kh*kw, L) columns
            cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
            y = (self.weight.reshape(self.out_channels, -1) @ cols).reshape(
                n, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def fast_small_maps(model):
    """Switch every 3x3 and 1x1 convolution of `model` to SmallMapConv2d in place.

    Parameters stay the same objects, so state_dict keys and optimizer state are unchanged.
    """
    for m in model.modules():
        if type(m) is nn.Conv2d and m.kernel_size in ((3, 3), (1, 1)):
            m.__class__ = SmallMapConv2d
    return model


def cpuinfo(field):
    """The first value of `field` in /proc/cpuinfo ('model name', 'flags'), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.split(":", 1)[0].strip() == field), None)
    except OSError:
        return None


def cpu_name():
    return cpuinfo("model name") or platform.processor() or platform.machine()


def machine_key():
    """What a measured choice holds for: this path's implementation, CPU, its ISA as each
    library sees it (ATen's capability, oneDNN's and MKL's limits), torch, threads."""
    cpu = cpu_name()
    isa = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "")
    return f"smallmaps v{VERSION}|{cpu}|{isa}|onednn {onednn or 'default'}|" \
           f"mkl {mkl or 'default'}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def _shape_key(m, shape, amp):
    return (f"{'bf16 ' if amp else ''}in{m.in_channels} out{m.out_channels} "
            f"k{m.kernel_size[0]}x{m.kernel_size[1]} s{m.stride[0]} p{m.padding[0]} "
            f"bias{m.bias is not None} input {'x'.join(map(str, shape))}")


def _time(conv, shape, dtype, matmul, reps, amp):
    """Median seconds of forward + backward of `conv` on a random input of `shape` and `dtype`
    (under bf16 autocast where `amp`), as the layer sees it in training."""
    conv.matmul = matmul
    x = torch.randn(shape).to(dtype).requires_grad_()
    ts = []
    for i in range(reps + 2):
        conv.zero_grad(set_to_none=True)  # as a training step: fresh gradients, none added
        x.grad = None
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = conv(x)
        y.float().sum().backward()
        if i >= 2:
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def tune(model, input_shape, cache=None, reps=TUNE_REPS, amp=False):
    """Set each SmallMapConv2d of `model` (on the CPU) to the path measured faster for its input
    shape at batch `input_shape[0]` (under bf16 autocast where `amp`); shapes measured before on
    this machine come from the cache.
    Returns {"matmul": [module names], "conv": [...], "measured": n, "cached": n}."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, SmallMapConv2d)}
    shapes = {}  # name -> (input shape, input dtype) as the layer sees them in this run
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: shapes.__setitem__(
        name, (tuple(a[0].shape), a[0].dtype))) for name, m in convs.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    path = os.path.join(cache or cache_dir(), "smallmaps.json")
    with _CacheLock(path):  # runs starting together: one measures, the others read its choice
        return _choose(convs, shapes, path, reps, amp)


class _CacheLock:
    """An flock on <cache>.lock while a run reads, measures and writes the cache; where the
    directory cannot be written the run measures alone."""

    def __init__(self, path):
        self.path, self.fd = path + ".lock", None

    def __enter__(self):
        import fcntl
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
        return False


def _choose(convs, shapes, path, reps, amp):
    """Each layer's path: from the cache at `path`, else measured now and cached."""
    cache = _read_cache(path)
    mkey = hashlib.sha256(machine_key().encode()).hexdigest()[:16]
    known = cache.setdefault(mkey, {"machine": machine_key(), "shapes": {}})["shapes"]
    out = {"matmul": [], "conv": [], "measured": 0, "cached": 0}
    for name, m in convs.items():
        shape, dtype = shapes[name]
        key = _shape_key(m, shape, amp)
        entry = known.get(key)
        if not (isinstance(entry, dict) and isinstance(entry.get("matmul"), bool)):
            probe = SmallMapConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                   m.padding, bias=m.bias is not None)
            t_conv = _time(probe, shape, dtype, False, reps, amp)
            t_mm = _time(probe, shape, dtype, True, reps, amp)
            known[key] = {"matmul": t_mm < (1 - MARGIN) * t_conv, "conv_ms": 1e3 * t_conv,
                          "matmul_ms": 1e3 * t_mm}
            out["measured"] += 1
        else:
            out["cached"] += 1
        m.matmul = bool(known[key]["matmul"])
        out["matmul" if m.matmul else "conv"].append(name)
    if out["measured"]:
        from ablation.core.io import write_json
        try:
            write_json(cache, path)
        except OSError:  # a read-only home: the choices still hold for this run
            pass
    return out


def apply_paths(model, paths):
    """Set the layers of `model` to recorded choices ({"matmul": [names], "conv": [names]}),
    e.g. a checkpoint's: a resumed run keeps the paths it started with."""
    for name, m in model.named_modules():
        if isinstance(m, SmallMapConv2d) and name in paths["matmul"] + paths["conv"]:
            m.matmul = name in paths["matmul"]


def _read_cache(path):
    try:
        with open(path) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) and all(
            isinstance(v, dict) and isinstance(v.get("shapes"), dict) for v in cache.values()) \
            else {}
    except (OSError, ValueError):
        return {}
