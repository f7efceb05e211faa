"""The training engine the train stage, the benchmarks and the GPU check share: devices, the
auto|true|false switches, model setup, batches, one training epoch, evaluation.

A run's fixed facts travel in a `RunContext`; loops take it and the batches, nothing else.
"""
import dataclasses
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from ablation.core.cli import UserError
from ablation.core.cores import machine_cores
from ablation.training import models
from ablation.training.params import PARAMS_FILE, SWITCHES, switch_value
from ablation.training.smallmaps import cpu_name, cpuinfo, fast_small_maps, tune

EVAL_BATCH = 1000  # images per evaluation batch
CHECK_EVERY = 50  # steps between finiteness checks of the running loss (a GPU sync)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every step needs: where it runs, how inputs are normalised and laid out."""
    device: torch.device
    mean: float  # training pixels in [0, 1]
    std: float
    channels_last: bool = False
    amp: bool = False  # bf16 autocast


def pick_device(name):
    """The torch device for train.device; `auto` picks cuda, then mps, then cpu."""
    have = {"cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None
            and torch.backends.mps.is_available(),
            "cpu": True}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if have[d])
    if not have[name]:
        ok = ["auto"] + [d for d in ("cpu", "cuda", "mps") if have[d]]
        raise UserError(f"{PARAMS_FILE}: train.device = '{name}': no {name} device on this "
                        f"machine (allowed here: {', '.join(ok)})")
    return torch.device(name)


MMAP_THRESHOLD = 32 << 20  # bytes: glibc's largest allowed; every ResNet tensor fits below it
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept instead of handed back to the OS


def _mallopt():
    """glibc's mallopt, or None (not Linux, musl and other C libraries)."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return None
    try:
        return ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None


def tune_allocator():
    """Let glibc malloc reuse freed tensor memory instead of mapping fresh pages every step.

    By default each tensor above 128 KB (weight gradients, Adam temporaries, activations) is a
    fresh mmap: zeroed pages, a page fault per 4 KB, unmapped again at free. Serving them from
    the heap made a ResNet-50 batch-16 CPU step about 20 % faster on the 2-core dev machine.
    Process-wide. Returns whether it applied (False without glibc).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and \
        bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def resolve_threads(cfg):
    """train.threads as a number. `auto`: the CPUs the run was given (ABLATION_CPUS, which
    grid run and grid sbatch set from what Ray or Slurm allotted), else every core this process
    may run on. More than those is a UserError: never more busy threads than cores."""
    cores = len(machine_cores())
    n = cfg["threads"]
    if n == "auto":
        given = os.environ.get("ABLATION_CPUS", "")
        return min(int(given), cores) if given.isdigit() and int(given) >= 1 else cores
    if n > cores:
        raise UserError(f"{PARAMS_FILE}: train.threads = {n}: runs here may use {cores} "
                        f"core(s) (allowed here: auto, 1..{cores})")
    return n


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and torch and oneDNN may
    use it: not where ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA hold them to an older ISA."""
    flags = (cpuinfo("flags") or "").split()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) \
        and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") \
        and (isa == "ALL" or "BF16" in isa or "AMX" in isa)


def resolve_switches(cfg, device):
    """The auto|true|false switches of `cfg` as what they mean on `device`, before any work.

    auto: the small-map matmul path on CPU where measured faster per layer (oneDNN's tiny-map
    convolutions are slow there; setup_model measures),
    channels_last on CUDA, the fused optimizer where torch has one (cpu, cuda), glibc malloc
    tuning where glibc is; compile_mode auto: max-autotune (CUDA graphs) on CUDA, else default;
    precision auto: bf16 on a CPU that computes it natively (cpu_has_bf16), else fp32.
    Returns {switch: bool, "precision": fp32|bf16, "compile_mode": str or None}; `true` where
    impossible is a UserError.
    """
    auto = {"small_maps": device.type == "cpu", "channels_last": device.type == "cuda",
            "fused_optimizer": device.type in ("cpu", "cuda"),
            "malloc_tuning": _mallopt() is not None}
    possible = {"fused_optimizer": auto["fused_optimizer"], "malloc_tuning": auto["malloc_tuning"]}
    out = {}
    for key in SWITCHES:
        v = switch_value(cfg[key])
        if v is True and not possible.get(key, True):
            raise UserError(f"{PARAMS_FILE}: train.{key} = true: not available on "
                            f"{device.type} here (allowed here: auto, false)")
        out[key] = auto[key] if v == "auto" else v
    out["precision"] = cfg["precision"] if cfg["precision"] != "auto" else \
        "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    mode = cfg["compile_mode"]
    if mode == "auto":
        mode = "max-autotune" if device.type == "cuda" else "default"
    out["compile_mode"] = mode if cfg["compile"] else None
    return out


def setup_model(name, cfg, device, sw, num_classes=10, image_shape=(1, 28, 28)):
    """Build `name` for `device` as the resolved switches `sw` say; returns (model, the module
    the loop calls: compiled or the model itself, optimizer, the small-map paths chosen or
    None). Seeds torch first. small_maps `auto` measures each layer's path on the CPU
    (smallmaps.tune, cached) for batches of `image_shape` images; `true` takes the fixed rule."""
    torch.manual_seed(cfg["seed"])
    model = models.build(name, cfg["stem"], num_classes, image_shape[0])
    paths = None
    if sw["small_maps"]:
        fast_small_maps(model)
        if switch_value(cfg["small_maps"]) == "auto":
            with torch.random.fork_rng(devices=[]):  # the run's random stream stays as it was
                paths = tune(model, (cfg["batch_size"], *image_shape),
                             amp=sw["precision"] == "bf16")
    model.to(device)
    if sw["channels_last"]:
        model.to(memory_format=torch.channels_last)
    opt = models.make_optimizer(model, cfg, sw["fused_optimizer"])
    step_model = torch.compile(model, mode=sw["compile_mode"]) if sw["compile_mode"] else model
    return model, step_model, opt, paths


class Batches(torch.utils.data.Dataset):
    """Indexed by a list of indices: returns a whole uint8 batch, no per-sample transforms."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


def epoch_batches(x, y, cfg, device, epoch, pin):
    """Iterator of (uint8 images, labels) batches for one epoch, shuffled by (seed, epoch).

    `dataloader`: a torch DataLoader honouring batch_size, pin_memory and num_workers.
    `resident`: x and y already live on `device`; batches are index slices there.
    """
    g = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch)
    bs = cfg["batch_size"]
    # a trailing batch of one image is left out: train-mode BatchNorm cannot normalise one
    # value per channel (layer4's 1x1 maps); dropped_per_epoch records it
    perm = torch.randperm(len(y), generator=g)[:len(y) - dropped_per_epoch(len(y), bs)]
    if cfg["loader"] == "resident":
        perm = perm.to(x.device)
        return ((x[i], y[i]) for i in perm.split(bs))
    sampler = list(perm.split(bs))
    return iter(torch.utils.data.DataLoader(
        Batches(x, y), sampler=sampler, batch_size=None, pin_memory=pin,
        num_workers=cfg["num_workers"], persistent_workers=False))


def dropped_per_epoch(n, batch_size):
    """Images left out of each epoch: a trailing batch of exactly one."""
    return 1 if n > batch_size and n % batch_size == 1 else 0


def normalise(xb, ctx):
    """uint8 (N, H, W) -> float (N, 1, H, W) standardised with the training-set mean/std."""
    x = xb.unsqueeze(1).float().div_(255.0).sub_(ctx.mean).div_(ctx.std)
    return x.contiguous(memory_format=torch.channels_last) if ctx.channels_last else x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train_one_epoch(model, opt, batches, ctx, log=lambda n: None):
    """One pass over `batches`; returns (mean loss, accuracy %, data_wait s, loop s, finite).
    The loop time includes waiting for data; `log(n)` after each batch (a progress bar)."""
    model.train()
    device = ctx.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    wait, seen, step = 0.0, 0, 0
    sync(device)
    t0 = time.perf_counter()
    while True:
        tw = time.perf_counter()
        try:
            xb, yb = next(batches)
        except StopIteration:
            break
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        wait += time.perf_counter() - tw
        x = normalise(xb, ctx)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            out = model(x)
            loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(yb)
        correct += (out.argmax(1) == yb).sum()
        seen += len(yb)
        step += 1
        if step % CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            break
        log(len(yb))
    sync(device)
    elapsed = time.perf_counter() - t0
    finite = bool(torch.isfinite(loss_sum))
    return (loss_sum.item() / max(seen, 1), 100.0 * correct.item() / max(seen, 1),
            wait, elapsed, finite)


@torch.no_grad()
def evaluate(model, x, y, ctx, log=lambda n: None):
    """Accuracy % and predictions on the whole (x, y), in eval mode, batches of EVAL_BATCH;
    `log(n)` after each batch (a progress bar)."""
    model.eval()
    preds = []
    for i in range(0, len(y), EVAL_BATCH):
        log(min(EVAL_BATCH, len(y) - i))
        xb = x[i:i + EVAL_BATCH].to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            preds.append(model(normalise(xb, ctx)).argmax(1))
    pred = torch.cat(preds).cpu()
    return 100.0 * (pred == y.cpu()).float().mean().item(), pred


def cuda_math(device):
    """The math modes a CUDA run actually used (torch's defaults unless changed: TF32 in cuDNN
    convolutions on, in matmuls off), and the CUDA version torch was built with; None off CUDA."""
    on = device.type == "cuda"
    return {"cuda_version": torch.version.cuda if on else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if on else None,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32 if on else None,
            "cudnn_benchmark": torch.backends.cudnn.benchmark if on else None}


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_isa():
    """The instruction set torch's CPU kernels use here ('AVX512', 'AVX2', 'DEFAULT':
    ATEN_CPU_CAPABILITY can hold it lower), and oneDNN's cap where ONEDNN_MAX_CPU_ISA sets one:
    'AVX512 (oneDNN SSE41)'. Numerics and speed differ with it, so runs record it."""
    isa = str(torch.backends.cpu.get_cpu_capability())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{isa} (oneDNN {cap[:20]})" if cap else isa


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} ({os.cpu_count()} cores)"
    return device.type
