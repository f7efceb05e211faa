"""train stage: one torchvision ResNet on one prepared dataset, with every knob of the study.

    python -m ablation.stages.train --data data/prepared/mnist.npz --model resnet18 \
        --metrics metrics/resnet/mnist/resnet18.json --out models/mnist/resnet18.pt \
        --ckpt models/mnist/resnet18.ckpt --live metrics/resnet/mnist/resnet18

Reads params.yaml sections `data` and `train`. A per-epoch checkpoint (model, optimizer, RNG
state, history) lets a killed run continue from its last completed epoch; on CPU the resumed
run ends with the same metrics as an uninterrupted one.
"""
import hashlib
import json
import os
import socket
import sys
import time

import numpy as np
import torch

from ablation.core.cli import Parser, UserError, run
from ablation.core.io import OutputLock, check_outputs, save_torch, write_json, write_metrics
from ablation.core.outputs import record_path
from ablation.training import engine, models
from ablation.training.datasets import load_prepared
from ablation.training.params import METRICS, PARAMS_FILE
from ablation.training.params import load as load_params
from ablation.training.smallmaps import apply_paths

SUBSET_SEED = 0  # train_limit takes a fixed random subset, the same for every train.seed


def main(cfg, data_cfg, data_path, model_name, metrics_path, model_path, ckpt_path=None,
         live_dir=None, progress=True):
    """Train `model_name` on the prepared data at `data_path`; write metrics, model, plots;
    return the metrics. `cfg`/`data_cfg` are validated params sections; everything else is
    checked before any work (device, outputs, the prepared file), then the outputs are locked
    against a second writer."""
    device = engine.pick_device(cfg["device"])
    sw = engine.resolve_switches(cfg, device)
    check_outputs(metrics_path, record_path(metrics_path), model_path, ckpt_path,
                  live_dir and os.path.join(live_dir, "metrics.json"))
    d = load_prepared(data_path)
    (x_tr, y_tr), (x_te, y_te) = select(d, data_cfg["train_limit"], cfg["loader"], device)
    with OutputLock(metrics_path):
        if sw["malloc_tuning"]:
            engine.tune_allocator()
        ctx = engine.RunContext(device, float(d["mean"]), float(d["std"]),
                                sw["channels_last"], sw["precision"] == "bf16")
        model, step_model, opt, paths = engine.setup_model(
            model_name, cfg, device, sw, len(d["classes"]), (1, *d["train_images"].shape[1:]))
        fp = fingerprint(cfg, data_path, model_name, data_cfg["train_limit"])
        history, paths = resume(ckpt_path, fp, model_name, model, opt, paths)
        live = open_live(live_dir, history)
        # a DataLoader pins its batches only for a GPU copy; resident data is never pinned
        pin = cfg["pin_memory"] and device.type == "cuda" and cfg["loader"] == "dataloader"
        pred = None
        for epoch in range(len(history), cfg["epochs"]):
            batches = engine.epoch_batches(x_tr, y_tr, cfg, device, epoch, pin)
            bar = engine.progress_bar(len(y_tr) + len(y_te),
                                      f"{model_name} epoch {epoch + 1}/{cfg['epochs']}", progress)
            h, pred = run_epoch(step_model, model, opt, batches, (x_te, y_te), ctx, bar)
            history.append({"epoch": epoch + 1, **h})
            print_epoch(history[-1], cfg["epochs"], len(y_tr))
            if live:
                log_epoch(live, history[-1])
            if h["test_acc"] is None:  # diverged: its weights are not finite
                break
            if ckpt_path:
                save_torch({"fingerprint": fp, "complete": False, "epoch": epoch + 1,
                            "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "rng": torch.get_rng_state(), "history": history,
                            "small_map_paths": paths}, ckpt_path)
        if pred is None and history[-1]["test_acc"] is not None:  # resumed a finished run
            _, pred = engine.evaluate(model, x_te, y_te, ctx)
        metrics = summarise(history, cfg, len(y_tr), model_name, model, d,
                            {**sw, "small_map_paths": paths, "pin_memory_effective": pin},
                            device)
        finish_live(live, live_dir, pred, y_te)
        save_torch({"model": model_name, "stem": cfg["stem"], "state_dict": model.state_dict(),
                    "params": {"train": cfg, "data": data_cfg}, "metrics": metrics,
                    "classes": [str(c) for c in d["classes"]], "mean": ctx.mean,
                    "std": ctx.std}, model_path)
        write_metrics(metrics, METRICS["train"], metrics_path)
        if ckpt_path:  # a finished run leaves a small marker, not a resumable state
            save_torch({"fingerprint": fp, "complete": True}, ckpt_path)
    state = f"DIVERGED at epoch {metrics['diverged_epoch']}" if metrics["diverged"] else \
        f"test accuracy {metrics['test_accuracy']:.2f}%"
    print(f"{model_name}: {state}, {metrics['images_per_s'] or 0:.0f} img/s, "
          f"train {metrics['train_time_ms'] / 1000:.1f} s on {metrics['device_name']}")
    return metrics


def select(d, limit, loader, device):
    """(train images, labels), (test images, labels) as tensors; `limit` takes a fixed random
    subset of the training images; `resident` puts the training data on `device`."""
    n = len(d["train_labels"])
    if limit is not None and limit > n:
        raise UserError(f"{PARAMS_FILE}: data.train_limit = {limit}: above the {n} training "
                        f"images (allowed: 2..{n} or null)")
    idx = np.arange(n)
    if limit is not None:
        idx = np.sort(np.random.default_rng(SUBSET_SEED).permutation(idx)[:limit])
    x_tr = torch.from_numpy(d["train_images"][idx])
    y_tr = torch.from_numpy(d["train_labels"][idx].astype(np.int64))
    if loader == "resident":
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    x_te = torch.from_numpy(d["test_images"]).to(device)
    return (x_tr, y_tr), (x_te, torch.from_numpy(d["test_labels"].astype(np.int64)))


def run_epoch(step_model, model, opt, batches, test, ctx, bar):
    """Train one epoch, then evaluate unless the loss diverged, under one progress bar of
    training + test images; returns (history entry, test predictions or None). The epoch time
    excludes evaluation."""
    x_te, y_te = test
    bar.set_postfix_str("train")
    loss, acc, wait, elapsed, finite = engine.train_one_epoch(step_model, opt, batches, ctx,
                                                              bar.update)
    test_acc, pred, eval_s = None, None, 0.0
    if finite:
        bar.set_postfix_str("evaluate")
        t0 = time.perf_counter()
        test_acc, pred = engine.evaluate(model, x_te, y_te, ctx, bar.update)
        engine.sync(ctx.device)
        eval_s = time.perf_counter() - t0
    bar.close()
    return {"train_loss": loss if finite else float("nan"), "train_acc": acc,
            "test_acc": test_acc, "epoch_time_s": elapsed, "data_wait_s": wait,
            "eval_time_s": eval_s}, pred


def print_epoch(h, epochs, n):
    if h["test_acc"] is None:
        print(f"epoch {h['epoch']}: loss is not finite; training stopped (diverged)")
        return
    print(f"epoch {h['epoch']}/{epochs}: loss {h['train_loss']:.4f} train {h['train_acc']:.2f}% "
          f"test {h['test_acc']:.2f}% {n / h['epoch_time_s']:.0f} img/s "
          f"(data wait {100 * h['data_wait_s'] / h['epoch_time_s']:.1f}%)")


def summarise(history, cfg, n_train, model_name, model, d, sw, device):
    """What the run recorded: measurements over the epochs run, and where and how it ran (`sw`:
    the resolved switches and settings)."""
    done = [h for h in history if h["test_acc"] is not None]
    diverged = next((h["epoch"] for h in history if h["test_acc"] is None), None)
    used = n_train - engine.dropped_per_epoch(n_train, cfg["batch_size"])
    train_s = sum(h["epoch_time_s"] for h in history)
    return {
        "test_accuracy": done[-1]["test_acc"] if done and not diverged else None,
        "train_time_ms": 1000 * train_s,
        "images_per_s": used * len(history) / train_s if train_s else None,
        "data_wait_ms": 1000 * sum(h["data_wait_s"] for h in history),
        "eval_time_ms": 1000 * sum(h["eval_time_s"] for h in history),
        "gflops": models.gflops(model_name, cfg["stem"], (1, *d["train_images"].shape[1:]),
                                len(d["classes"])),
        "params_m": models.count_params(model) / 1e6,
        "peak_memory_mb": engine.peak_memory_mb(device),
        "epochs_completed": len(done),
        "diverged": diverged is not None,
        "diverged_epoch": diverged,
        "final_train_loss": done[-1]["train_loss"] if done else None,
        "train_images": n_train,
        "dropped_per_epoch": n_train - used,
        "loader": cfg["loader"],
        "device": device.type,
        "device_name": engine.device_name(device),
        "host": socket.gethostname(),
        # where a scheduler put the run: the GPUs it was given, the Ray node (grid run sets it)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ray_node_id": os.environ.get("ABLATION_RAY_NODE_ID"),
        "torch_version": str(torch.__version__),
        "threads": torch.get_num_threads(),
        # how the run shared its device: `solo`, or what packed several runs on one GPU (the GPU
        # study's launcher, or Ray's fractional GPUs: grid run --gpus-per-run 0.25); `sw` (a
        # fused pack) overrides both
        "packing": os.environ.get("ABLATION_PACKING") or "solo",
        "gpu_shared_by": shared_by(device),
        **engine.cuda_math(device),
        **sw,
    }


def shared_by(device):
    """How many runs shared this run's GPU (ABLATION_GPU_SHARED_BY, set by whatever packed
    them), 1 for a GPU run alone, None off the GPU unless a scheduler said so."""
    v = os.environ.get("ABLATION_GPU_SHARED_BY", "")
    if v.isdigit() and int(v) >= 1:
        return int(v)
    return 1 if device.type == "cuda" else None


def finish_live(live, live_dir, pred, y_te):
    """The confusion matrix (an empty one where the run diverged: DVC expects the file)."""
    if not live:
        return
    if pred is not None:
        live.log_sklearn_plot("confusion_matrix", y_te.numpy(), pred.numpy(),
                              name="confusion_matrix.json")
    else:
        write_json([], os.path.join(live_dir, "plots", "sklearn", "confusion_matrix.json"))
    live.end()


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


def resume(ckpt_path, fp, model_name, model, opt, paths):
    """Load a matching checkpoint into model and optimizer, and the small-map paths the run
    started with; returns (the epochs' history so far, the paths in force)."""
    ck = load_checkpoint(ckpt_path, fp)
    if ck is None:
        return [], paths
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    saved = ck.get("small_map_paths")
    if isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("matmul", "conv")):
        apply_paths(model, saved)
        paths = saved
    print(f"resuming {model_name} from checkpoint {ckpt_path} after epoch {ck['epoch']}")
    return ck["history"], paths


def open_live(live_dir, history):
    """A dvclive logger replaying what a checkpoint already holds, or None. Without dvclive
    (the bare GPU machine) the same files come from TsvLive."""
    if not live_dir:
        return None
    try:
        from dvclive import Live
    except ImportError:
        live = TsvLive(live_dir)
    else:
        live = Live(live_dir, save_dvc_exp=False, dvcyaml=None, report=None)
    for h in history:
        log_epoch(live, h)
    return live


class TsvLive:
    """The files dvclive's Live writes for the train stage, where dvclive is not installed (the
    bare GPU machine): per-step metrics as plots/metrics/<name>.tsv (header `step<TAB>name`,
    one row per step, floats as str() writes them, as csv does for dvclive) and the confusion
    matrix as plots/sklearn/<name> ([{actual, predicted}], 4-space JSON). Like Live without
    resume, it starts from an empty plots/ folder."""

    def __init__(self, live_dir):
        import shutil
        self.dir = os.fspath(live_dir)
        shutil.rmtree(os.path.join(self.dir, "plots"), ignore_errors=True)
        self.step = 0

    def log_metric(self, name, val):
        import math
        if not isinstance(val, str) and (math.isnan(val) or math.isinf(val)):
            val = str(val)
        path = os.path.join(self.dir, "plots", "metrics", f"{name}.tsv")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", encoding="utf-8", newline="") as f:
            if new:
                f.write(f"step\t{os.path.basename(name)}{os.linesep}")
            f.write(f"{self.step}\t{val}{os.linesep}")

    def next_step(self):
        self.step += 1

    def log_sklearn_plot(self, kind, labels, predictions, name):
        assert kind == "confusion_matrix", kind  # the only plot the train stage draws
        path = os.path.join(self.dir, "plots", "sklearn", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"actual": str(a), "predicted": str(p)}
                       for a, p in zip(labels, predictions)], f, indent=4)
            f.write("\n")

    def end(self):
        pass


def log_epoch(live, h):
    live.log_metric("train/loss", h["train_loss"])
    live.log_metric("train/accuracy", h["train_acc"])
    if h["test_acc"] is not None:
        live.log_metric("test/accuracy", h["test_acc"])
    live.log_metric("epoch_time_s", h["epoch_time_s"])
    live.next_step()


def _cli(argv):
    ap = Parser(
        prog="python -m ablation.stages.train",
        description="Train one ResNet on one prepared dataset with params.yaml's `data` and "
                    "`train` sections (dvc.yaml's train stage calls this).")
    ap.add_argument("--data", required=True, help="prepared dataset (.npz from the prepare stage)")
    ap.add_argument("--model", required=True, choices=list(models.MODELS),
                    help="architecture: %(choices)s")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--out", required=True, help="model file to write (torch.save of a plain dict)")
    ap.add_argument("--ckpt", help="per-epoch checkpoint: resumed if it matches params and data")
    ap.add_argument("--live", help="dvclive directory for per-epoch curves and the "
                                    "confusion matrix")
    ap.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    a = ap.parse_args(argv)
    p = load_params(["data", "train"], a.params)
    main(p["train"], p["data"], a.data, a.model, a.metrics, a.out, a.ckpt, a.live)


if __name__ == "__main__":
    run(_cli)
