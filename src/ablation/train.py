"""train stage: one torchvision ResNet on one prepared dataset, with every knob of the study.

    python -m ablation.train --data data/prepared/mnist.npz --model resnet18 \
        --metrics metrics/resnet/mnist/resnet18.json --out models/mnist/resnet18.pt \
        --ckpt models/mnist/resnet18.ckpt --live metrics/resnet/mnist/resnet18

Reads params.yaml sections `data` and `train`. A per-epoch checkpoint (model, optimizer, RNG
state, history) lets a killed run continue from its last completed epoch; on CPU the resumed
run ends with the same metrics as an uninterrupted one.
"""
import hashlib
import json
import os
import resource
import socket
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import models, params as P
from .cli import (OutputLock, Parser, UserError, bounded, check_outputs, replace_atomic, run,
                  write_json)
from .prepare import load as load_prepared

EVAL_BATCH = 1000  # images per evaluation batch
CHECK_EVERY = 50  # steps between finiteness checks of the running loss (a GPU sync)
SUBSET_SEED = 0  # train_limit takes a fixed random subset, the same for every train.seed


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
        raise UserError(f"{P.PARAMS_FILE}: train.device = '{name}': no {name} device on this "
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


def resolve_switches(cfg, device):
    """The auto|true|false switches of `cfg` as what they mean on `device`, before any work.

    auto: the small-map matmul path on CPU (oneDNN's tiny-map convolutions are slow there),
    channels_last on CUDA, the fused optimizer where torch has one (cpu, cuda), glibc malloc
    tuning where glibc is; compile_mode auto: max-autotune (CUDA graphs) on CUDA, else default.
    Returns {switch: bool, "compile_mode": str or None}; `true` where impossible is a UserError.
    """
    auto = {"small_maps": device.type == "cpu", "channels_last": device.type == "cuda",
            "fused_optimizer": device.type in ("cpu", "cuda"),
            "malloc_tuning": _mallopt() is not None}
    possible = {"fused_optimizer": auto["fused_optimizer"], "malloc_tuning": auto["malloc_tuning"]}
    out = {}
    for key in P.SWITCHES:
        v = P.switch_value(cfg[key])
        if v is True and not possible.get(key, True):
            raise UserError(f"{P.PARAMS_FILE}: train.{key} = true: not available on "
                            f"{device.type} here (allowed here: auto, false)")
        out[key] = auto[key] if v == "auto" else v
    mode = cfg["compile_mode"]
    if mode == "auto":
        mode = "max-autotune" if device.type == "cuda" else "default"
    out["compile_mode"] = mode if cfg["compile"] else None
    return out


def make_optimizer(model, cfg, fused):
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"], fused=fused)
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"],
                                weight_decay=cfg["weight_decay"], fused=fused)
    raise UserError(f"unknown optimizer '{cfg['optimizer']}' (valid: {', '.join(P.OPTIMIZERS)})")


def setup_model(name, cfg, device, sw, num_classes=10):
    """Build `name` for `device` as the resolved switches `sw` say; returns (model, the module
    the loop calls: compiled or the model itself, optimizer). Seeds torch first."""
    torch.manual_seed(cfg["seed"])
    model = models.build(name, cfg["stem"], num_classes)
    if sw["small_maps"]:
        models.fast_small_maps(model)
    model.to(device)
    if sw["channels_last"]:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, sw["fused_optimizer"])
    step_model = torch.compile(model, mode=sw["compile_mode"]) if sw["compile_mode"] else model
    return model, step_model, opt


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


def normalise(xb, mean, std, channels_last):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) standardised with the training-set mean/std."""
    x = xb.unsqueeze(1).float().div_(255.0).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train_one_epoch(model, opt, batches, ctx, log):
    """One pass over `batches`; returns (mean loss, accuracy %, data_wait s, loop s, finite)."""
    model.train()
    device, mean, std, cl, amp = ctx["device"], ctx["mean"], ctx["std"], ctx["cl"], ctx["amp"]
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
        x = normalise(xb, mean, std, cl)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
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
        xb = x[i:i + EVAL_BATCH].to(ctx["device"], non_blocking=True)
        with torch.autocast(ctx["device"].type, dtype=torch.bfloat16, enabled=ctx["amp"]):
            preds.append(model(normalise(xb, ctx["mean"], ctx["std"], ctx["cl"])).argmax(1))
    pred = torch.cat(preds).cpu()
    return 100.0 * (pred == y.cpu()).float().mean().item(), pred


def fingerprint(cfg, data_path, model_name, limit):
    """What a checkpoint must match to be resumed: params, model, and the data file's bytes."""
    h = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    key = json.dumps({"train": cfg, "model": model_name, "train_limit": limit,
                      "data": h.hexdigest()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def load_checkpoint(path, fp):
    """The checkpoint dict to resume from, or None (absent, finished, foreign or corrupt)."""
    if not path or not os.path.exists(path):
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or garbage file: say so in one line, start afresh
        print(f"checkpoint {path} is unreadable ({type(e).__name__}); training from scratch",
              file=sys.stderr)
        return None
    if not isinstance(ck, dict) or ck.get("fingerprint") != fp or ck.get("complete", True):
        return None
    return ck


def save_torch(obj, path):
    replace_atomic(lambda tmp: torch.save(obj, tmp), path)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_model(name):
    if name not in models.BUILDERS:
        raise UserError(f"unknown model '{bounded(name, 50)}' (valid: {', '.join(models.BUILDERS)})")


def check(data_cfg, n_train):
    """The subset size against the data."""
    limit = data_cfg["train_limit"]
    if limit is not None and limit > n_train:
        raise UserError(f"{P.PARAMS_FILE}: data.train_limit = {limit}: above the {n_train} "
                        f"training images (allowed: 2..{n_train} or null)")


def main(cfg, data_cfg, data_path, model_name, metrics_path, model_path, ckpt_path=None,
         live_dir=None, progress=True):
    """Train `model_name` on the prepared data at `data_path`; write metrics, model, plots.

    Everything is checked before any work: params, device, outputs (writable, not
    directories), the prepared file; then the outputs are locked against a second writer."""
    device = pick_device(cfg["device"])
    sw = resolve_switches(cfg, device)
    check_model(model_name)
    check_outputs(metrics_path, model_path, ckpt_path,
                  live_dir and os.path.join(live_dir, "metrics.json"))
    d = load_prepared(data_path)
    check(data_cfg, len(d["train_labels"]))
    with OutputLock(metrics_path):
        return _train(cfg, data_cfg, d, device, sw, data_path, model_name, metrics_path,
                      model_path, ckpt_path, live_dir, progress)


def _train(cfg, data_cfg, d, device, sw, data_path, model_name, metrics_path, model_path,
           ckpt_path, live_dir, progress):
    limit = data_cfg["train_limit"]
    idx = np.arange(len(d["train_labels"]))
    if limit is not None:
        idx = np.sort(np.random.default_rng(SUBSET_SEED).permutation(idx)[:limit])
    x_tr, y_tr = torch.from_numpy(d["train_images"][idx]), torch.from_numpy(
        d["train_labels"][idx].astype(np.int64))
    x_te, y_te = torch.from_numpy(d["test_images"]), torch.from_numpy(
        d["test_labels"].astype(np.int64))
    if cfg["loader"] == "resident":
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    x_te = x_te.to(device)
    # a DataLoader pins its batches only for a GPU copy; resident data is never pinned
    pin = cfg["pin_memory"] and device.type == "cuda" and cfg["loader"] == "dataloader"
    ctx = {"device": device, "mean": float(d["mean"]), "std": float(d["std"]),
           "cl": sw["channels_last"], "amp": cfg["precision"] == "bf16"}
    if sw["malloc_tuning"]:
        tune_allocator()
    model, step_model, opt = setup_model(model_name, cfg, device, sw, len(d["classes"]))
    n_params = models.count_params(model)

    fp = fingerprint(cfg, data_path, model_name, limit)
    ck = load_checkpoint(ckpt_path, fp)
    history, start = [], 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        history, start = ck["history"], ck["epoch"]
        print(f"resuming {model_name} from checkpoint {ckpt_path} after epoch {start}")

    live = None
    if live_dir:
        from dvclive import Live
        live = Live(live_dir, save_dvc_exp=False, dvcyaml=None, report=None)
        for h in history:  # replay what the checkpoint already holds
            log_epoch(live, h)

    diverged_epoch, pred = None, None
    for epoch in range(start, cfg["epochs"]):
        bar = progress_bar(len(y_tr), f"{model_name} epoch {epoch + 1}/{cfg['epochs']}",
                           progress)
        batches = epoch_batches(x_tr, y_tr, cfg, device, epoch, pin)
        loss, acc, wait, elapsed, finite = train_one_epoch(
            step_model, opt, batches, ctx, bar.update)
        bar.close()
        if not finite:
            diverged_epoch = epoch + 1
            print(f"epoch {epoch + 1}: loss is not finite; training stopped (diverged)")
            h = {"epoch": epoch + 1, "train_loss": float("nan"), "train_acc": acc,
                 "test_acc": None, "epoch_time_s": elapsed, "data_wait_s": wait,
                 "eval_time_s": 0.0}
            history.append(h)
            if live:  # the curves show the diverged epoch too, and the plot files exist
                log_epoch(live, h)
            break
        t0 = time.perf_counter()
        bar = progress_bar(len(y_te), f"{model_name} evaluate {epoch + 1}", progress)
        test_acc, pred = evaluate(model, x_te, y_te, ctx, bar.update)
        bar.close()
        sync(device)
        h = {"epoch": epoch + 1, "train_loss": loss, "train_acc": acc, "test_acc": test_acc,
             "epoch_time_s": elapsed, "data_wait_s": wait,
             "eval_time_s": time.perf_counter() - t0}
        history.append(h)
        print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss:.4f} train {acc:.2f}% "
              f"test {test_acc:.2f}% {len(y_tr) / elapsed:.0f} img/s "
              f"(data wait {100 * wait / elapsed:.1f}%)")
        if live:
            log_epoch(live, h)
        if ckpt_path:
            save_torch({"fingerprint": fp, "complete": False, "epoch": epoch + 1,
                        "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "rng": torch.get_rng_state(), "history": history}, ckpt_path)

    done = [h for h in history if h["test_acc"] is not None]
    used = len(y_tr) - dropped_per_epoch(len(y_tr), cfg["batch_size"])
    train_s = sum(h["epoch_time_s"] for h in history)
    if diverged_epoch:  # its weights are not finite: an accuracy would be noise
        test_acc, pred = None, None
    elif pred is None:  # resumed from a checkpoint that had finished every epoch
        test_acc, pred = evaluate(model, x_te, y_te, ctx)
    else:
        test_acc = done[-1]["test_acc"]
    metrics = {
        "test_accuracy": test_acc,
        "train_time_ms": 1000 * train_s,
        "images_per_s": used * len(history) / train_s if train_s else None,
        "data_wait_ms": 1000 * sum(h["data_wait_s"] for h in history),
        "eval_time_ms": 1000 * sum(h["eval_time_s"] for h in history),
        "gflops": models.gflops(model_name, cfg["stem"]),
        "params_m": n_params / 1e6,
        "peak_memory_mb": peak_memory_mb(device),
        "epochs_completed": len(done),
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "final_train_loss": done[-1]["train_loss"] if done else None,
        "train_images": len(y_tr),
        "dropped_per_epoch": len(y_tr) - used,
        "loader": cfg["loader"],
        "pin_memory_effective": pin,
        **sw,
        "device": device.type,
        "device_name": device_name(device),
        "host": socket.gethostname(),
        # where a scheduler put the run: the GPUs it was given, the Ray node (grid run sets it)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ray_node_id": os.environ.get("ABLATION_RAY_NODE_ID"),
        "torch_version": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    if live and pred is not None:
        live.log_sklearn_plot("confusion_matrix", y_te.numpy(), pred.numpy(),
                              name="confusion_matrix.json")
    elif live:  # diverged: no predictions, but DVC expects the plot file
        write_json([], os.path.join(live_dir, "plots", "sklearn", "confusion_matrix.json"))
    if live:
        live.end()
    save_torch({"model": model_name, "stem": cfg["stem"], "state_dict": model.state_dict(),
                "params": {"train": cfg, "data": data_cfg}, "metrics": metrics,
                "classes": [str(c) for c in d["classes"]], "mean": ctx["mean"],
                "std": ctx["std"]}, model_path)
    write_json(metrics, metrics_path)
    if ckpt_path:  # a finished run leaves a small marker, not a resumable state
        save_torch({"fingerprint": fp, "complete": True}, ckpt_path)
    state = f"DIVERGED at epoch {diverged_epoch}" if diverged_epoch else \
        f"test accuracy {test_acc:.2f}%"
    print(f"{model_name}: {state}, {metrics['images_per_s'] or 0:.0f} img/s, "
          f"train {train_s:.1f} s on {metrics['device_name']}")
    return metrics


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total, desc, enabled):
    """A tqdm bar of images; nothing when disabled (tests) or where tqdm is not installed."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # e.g. the bare GPU machine: dvc brings tqdm, torch does not
            return _NoBar()
        return tqdm(total=total, desc=desc, unit="img", leave=False, mininterval=1.0)
    return _NoBar()


def log_epoch(live, h):
    live.log_metric("train/loss", h["train_loss"])
    live.log_metric("train/accuracy", h["train_acc"])
    if h["test_acc"] is not None:
        live.log_metric("test/accuracy", h["test_acc"])
    live.log_metric("epoch_time_s", h["epoch_time_s"])
    live.next_step()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"{name} ({os.cpu_count()} cores)"
    return device.type


def _cli(argv):
    ap = Parser(
        prog="python -m ablation.train",
        description="Train one ResNet on one prepared dataset with params.yaml's `data` and "
                    "`train` sections (dvc.yaml's train stage calls this).")
    ap.add_argument("--data", required=True, help="prepared dataset (.npz from the prepare stage)")
    ap.add_argument("--model", required=True, help=f"one of {', '.join(models.BUILDERS)}")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--out", required=True, help="model file to write (torch.save of a plain dict)")
    ap.add_argument("--ckpt", help="per-epoch checkpoint: resumed if it matches params and data")
    ap.add_argument("--live", help="dvclive directory for per-epoch curves and the confusion matrix")
    ap.add_argument("--params", default=P.PARAMS_FILE, help="params file (default: %(default)s)")
    a = ap.parse_args(argv)
    p = P.load(["data", "train"], a.params)
    main(p["train"], p["data"], a.data, a.model, a.metrics, a.out, a.ckpt, a.live)


if __name__ == "__main__":
    run(_cli)
