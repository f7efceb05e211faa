"""train stage: one torchvision ResNet on one prepared dataset, with every knob of the study.

    python -m ablation.stages.train --data data/prepared/mnist.npz --model resnet18 \
        --metrics metrics/resnet/mnist/resnet18.json --out models/mnist/resnet18.pt \
        --ckpt models/mnist/resnet18.ckpt --live metrics/resnet/mnist/resnet18

Reads params.yaml sections `data` and `train`. The run computes with train.threads threads and
holds as many of the machine's cores while it runs (core/cores.py). A per-epoch checkpoint
(model, optimizer, RNG state, history; --ckpt and this machine's store) lets a stopped or
killed run continue from its last finished epoch; on CPU the resumed run ends with the same
metrics as an uninterrupted one. SIGINT or SIGTERM: one line saying what was kept, exit status
130 or 143, no output half-written.
"""
import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from ablation.core.cli import Parser, UserError, progress_bar, run
from ablation.core.cores import CoreHold, Load
from ablation.core.io import (
    OutputLock,
    check_outputs,
    replace_atomic,
    save_torch,
    write_metrics,
)
from ablation.core.outputs import record_path
from ablation.training import engine, models
from ablation.training.datasets import limited, load_prepared
from ablation.training.live import finish_live, log_epoch, open_live
from ablation.training.params import METRICS, PARAMS_FILE
from ablation.training.params import load as load_params
from ablation.training.smallmaps import apply_paths, cache_dir


def main(cfg, data_cfg, data_path, model_name, metrics_path, model_path, ckpt_path=None,
         live_dir=None, progress=True):
    """Train `model_name` on the prepared data at `data_path`; write metrics, model, plots;
    return the metrics. `cfg`/`data_cfg` are validated params sections; everything else is
    checked before any work (device, threads, outputs, the prepared file), then the outputs are
    locked against a second writer and the run holds its cores (waiting while other runs hold
    them). SIGINT/SIGTERM stop it with the finished epochs checkpointed: the same command
    resumes."""
    device = engine.pick_device(cfg["device"])
    sw = engine.resolve_switches(cfg, device)
    threads = engine.resolve_threads(cfg)
    check_outputs(metrics_path, record_path(metrics_path), model_path, ckpt_path,
                  live_dir and os.path.join(live_dir, "metrics.json"))
    d = load_prepared(data_path)
    (x_tr, y_tr), (x_te, y_te) = select(d, data_cfg, cfg["loader"], device)
    with OutputLock(metrics_path), CoreHold(threads, lambda t: print(t, flush=True)) as cores:
        torch.set_num_threads(threads)
        if sw["malloc_tuning"]:
            engine.tune_allocator()
        ctx = engine.RunContext(device, float(d["mean"]), float(d["std"]),
                                sw["channels_last"], sw["precision"] == "bf16")
        model, step_model, opt, paths = engine.setup_model(
            model_name, cfg, device, sw, len(d["classes"]), (1, *d["train_images"].shape[1:]))
        ckpt = Checkpoint(ckpt_path, fingerprint(cfg, data_path, model_name, data_cfg))
        history, paths = resume(ckpt, model_name, model, opt, paths)
        ckpt.small_map_paths = paths
        live = open_live(live_dir, history)
        # a DataLoader pins its batches only for a GPU copy; resident data is never pinned
        pin = cfg["pin_memory"] and device.type == "cuda" and cfg["loader"] == "dataloader"
        run = Epochs(step_model, model, opt, ctx, (x_tr, y_tr), (x_te, y_te), live, progress)
        pred = run.all(cfg, model_name, history, pin, ckpt)
        if pred is None and history[-1]["test_acc"] is not None:  # resumed a finished run
            bar = progress_bar(len(y_te), f"{model_name} evaluate", progress)
            _, pred = engine.evaluate(model, x_te, y_te, ctx, bar.update)
            bar.close()
        metrics = summarise(history, cfg, len(y_tr), model_name, model, d,
                            {**sw, "small_map_paths": paths, "pin_memory_effective": pin,
                             "threads": threads, "cores_wait_s": round(cores.waited_s, 3)},
                            device, n_test=len(y_te), pruned=run.pruned)
        finish_live(live, live_dir, pred, y_te)
        save_torch({"model": model_name, "stem": cfg["stem"], "state_dict": model.state_dict(),
                    "params": {"train": cfg, "data": data_cfg}, "metrics": metrics,
                    "classes": [str(c) for c in d["classes"]], "mean": ctx.mean,
                    "std": ctx.std}, model_path)
        write_metrics(metrics, METRICS["train"], metrics_path)
        ckpt.finish()
    state = f"DIVERGED at epoch {metrics['diverged_epoch']}" if metrics["diverged"] else \
        f"test accuracy {metrics['test_accuracy']:.2f}%" + (
            f" (pruned after epoch {metrics['epochs_completed']})" if run.pruned else "")
    print(f"{model_name}: {state}, {metrics['images_per_s'] or 0:.0f} img/s, "
          f"train {metrics['train_time_ms'] / 1000:.1f} s on {metrics['device_name']}")
    return metrics


class Epochs:
    """The epoch loop of one run: train, evaluate, log, checkpoint; an interrupt names the
    epochs kept."""

    def __init__(self, step_model, model, opt, ctx, train, test, live, progress):
        self.step_model, self.model, self.opt, self.ctx = step_model, model, opt, ctx
        self.train, self.test, self.live, self.progress = train, test, live, progress
        self.pruned = False  # a search stopped it (verdict)

    def all(self, cfg, model_name, history, pin, ckpt):
        """Run the epochs `history` lacks, appending to it; returns the last test predictions
        (None where no epoch ran or the last diverged). An interrupt says what was kept."""
        ckpt.saved = len(history) if ckpt.path else 0
        try:
            if len(history) < cfg["epochs"]:  # a log's (and a waiting test's) sign of the start
                print(f"{model_name}: training epochs {len(history) + 1}-{cfg['epochs']} on "
                      f"{len(self.train[1])} images", flush=True)
            return self._loop(cfg, model_name, history, pin, ckpt)
        except KeyboardInterrupt as e:
            e.note = (f"{model_name} stopped in epoch {len(history) + 1} of {cfg['epochs']}; "
                      + (f"{ckpt.saved} finished epoch(s) checkpointed: the same command "
                         f"resumes from there" if ckpt.saved else
                         "no finished epoch kept: the same command starts afresh"))
            raise

    def _loop(self, cfg, model_name, history, pin, ckpt):
        (x_tr, y_tr), pred = self.train, None
        for epoch in range(len(history), cfg["epochs"]):
            batches = engine.epoch_batches(x_tr, y_tr, cfg, self.ctx.device, epoch, pin)
            bar = progress_bar(len(y_tr) + len(self.test[1]),
                               f"{model_name} epoch {epoch + 1}/{cfg['epochs']}", self.progress)
            h, pred = run_epoch(self.step_model, self.model, self.opt, batches, self.test,
                                self.ctx, bar)
            history.append({"epoch": epoch + 1, **h})
            print_epoch(history[-1], cfg["epochs"], len(y_tr))
            if self.live:
                log_epoch(self.live, history[-1])
            if h["test_acc"] is None:  # diverged: its weights are not finite
                break
            ckpt.save(epoch + 1, self.model, self.opt, history)
            if epoch + 1 < cfg["epochs"] and verdict(cfg["trial"], epoch + 1) == "stop":
                self.pruned = True
                print(f"{model_name}: pruned by the search after epoch {epoch + 1}", flush=True)
                break
        return pred


TRIAL_WAIT_S = 600  # for a search's verdict after an epoch; then the run goes on


def verdict(trial, epoch):
    """`stop` or `go` for a search trial (train.trial) after `epoch`: the search (grid/search.py)
    writes `stop` or `go` to $ABLATION_TRIAL_DIR/<epoch> once its pruner has read the epoch's
    accuracy from the epoch line, and the run waits for it, so a pruned run stops at exactly
    the epoch decided. `go` outside a search (no trial, or no such folder: `dvc exp run -S
    train.trial=x` by hand) and where no verdict comes within TRIAL_WAIT_S (a search lost)."""
    folder = os.environ.get("ABLATION_TRIAL_DIR")
    if not trial or not folder:
        return "go"
    path, deadline = os.path.join(folder, str(epoch)), time.monotonic() + TRIAL_WAIT_S
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                answer = f.read(8).strip()
            if answer in ("stop", "go"):
                return answer
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    print(f"no verdict from the search on epoch {epoch} in {TRIAL_WAIT_S} s: training goes on",
          file=sys.stderr, flush=True)
    return "go"


def select(d, data_cfg, loader, device):
    """(train images, labels), (test images, labels) as tensors; data.train_limit and
    data.test_limit take fixed random subsets of the splits; `resident` puts the training data
    on `device`."""
    n = len(d["train_labels"])
    limit = data_cfg["train_limit"]
    if limit is not None and limit > n:
        raise UserError(f"{PARAMS_FILE}: data.train_limit = {limit}: above the {n} training "
                        f"images (allowed: 2..{n} or null)")
    idx = limited(n, limit, "train")
    x_tr = torch.from_numpy(d["train_images"][idx])
    y_tr = torch.from_numpy(d["train_labels"][idx].astype(np.int64))
    if loader == "resident":
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    te = limited(len(d["test_labels"]), data_cfg.get("test_limit"), "test")
    x_te = torch.from_numpy(d["test_images"][te]).to(device)
    return (x_tr, y_tr), (x_te, torch.from_numpy(d["test_labels"][te].astype(np.int64)))


def run_epoch(step_model, model, opt, batches, test, ctx, bar):
    """Train one epoch, then evaluate unless the loss diverged, under one progress bar of
    training + test images; returns (history entry, test predictions or None). The epoch time
    excludes evaluation."""
    x_te, y_te = test
    test_acc, pred, eval_s = None, None, 0.0
    try:
        bar.set_postfix_str("train")
        with Load() as load:  # how busy other processes kept the machine meanwhile
            loss, acc, wait, elapsed, finite = engine.train_one_epoch(step_model, opt, batches,
                                                                      ctx, bar.update)
        if finite:
            bar.set_postfix_str("evaluate")
            t0 = time.perf_counter()
            test_acc, pred = engine.evaluate(model, x_te, y_te, ctx, bar.update)
            engine.sync(ctx.device)
            eval_s = time.perf_counter() - t0
    finally:  # an interrupt's line starts on a clean line
        bar.close()
    return {"train_loss": loss if finite else float("nan"), "train_acc": acc,
            "test_acc": test_acc, "epoch_time_s": elapsed, "data_wait_s": wait,
            "eval_time_s": eval_s, "other_load_cores": load.cores,
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds")}, pred


def print_epoch(h, epochs, n):
    if h["test_acc"] is None:
        print(f"epoch {h['epoch']}: loss is not finite; training stopped (diverged)")
        return
    print(f"epoch {h['epoch']}/{epochs}: loss {h['train_loss']:.4f} train {h['train_acc']:.2f}% "
          f"test {h['test_acc']:.2f}% {n / h['epoch_time_s']:.0f} img/s "
          f"(data wait {100 * h['data_wait_s'] / h['epoch_time_s']:.1f}%)")


def summarise(history, cfg, n_train, model_name, model, d, sw, device, n_test=None,
              pruned=False):
    """What the run recorded: measurements over the epochs run, and where and how it ran (`sw`:
    the resolved switches and settings; they override what is read here). `pruned`: a search
    stopped it after its last epoch (its accuracy is that epoch's)."""
    done = [h for h in history if h["test_acc"] is not None]
    diverged = next((h["epoch"] for h in history if h["test_acc"] is None), None)
    used = n_train - engine.dropped_per_epoch(n_train, cfg["batch_size"])
    train_s = sum(h["epoch_time_s"] for h in history)
    loads = [h["other_load_cores"] for h in history if h.get("other_load_cores") is not None]
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
        "pruned": pruned,
        "final_train_loss": done[-1]["train_loss"] if done else None,
        "train_images": n_train,
        "test_images": n_test if n_test is not None else len(d["test_labels"]),
        "dropped_per_epoch": n_train - used,
        "loader": cfg["loader"],
        # the normalisation the model expects: (pixels / 255 - mean) / std, the training split's
        "data_mean": float(d["mean"]),
        "data_std": float(d["std"]),
        "device": device.type,
        "device_name": engine.device_name(device),
        "cpu_isa": engine.cpu_isa(),
        "host": socket.gethostname(),
        # where a scheduler put the run: the GPUs it was given, the Ray node (grid run sets it)
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ray_node_id": os.environ.get("ABLATION_RAY_NODE_ID"),
        "torch_version": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cores_wait_s": None,  # the train stage's own runs say how long they waited for cores
        # other processes' CPU over the timed epochs, in cores (the busiest epoch; core.cores.
        # Load), and when the last epoch's timed work ended (UTC): a run restored from DVC's
        # run cache keeps both, so the report sees when and beside what it really trained
        "other_load_cores": round(max(loads), 3) if loads else None,
        "timed_end": history[-1].get("ended") if history else None,
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


def fingerprint(cfg, data_path, model_name, data_cfg):
    """What a checkpoint must match to be resumed: params, model, and the data file's bytes."""
    h = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    key = json.dumps({"train": cfg, "model": model_name, "train_limit": data_cfg["train_limit"],
                      "test_limit": data_cfg.get("test_limit"), "data": h.hexdigest()},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


class Checkpoint:
    """Where a run keeps its finished epochs (model, optimizer, RNG state, history, small-map
    paths): `path` (--ckpt, in the workspace; None: nowhere) and a copy in this machine's store,
    named by the fingerprint (<cache dir>/checkpoints/<fp>.ckpt). A run stopped in a temporary
    workspace (a DVC queue worker's, a Ray task's clone) resumes from the store when the same
    run starts again anywhere on this machine; a finished run removes its copy."""

    def __init__(self, path, fp, paths=None):
        self.path, self.fp, self.small_map_paths = path, fp, paths
        self.saved = 0  # epochs the checkpoint holds
        self.store = os.path.join(cache_dir(), "checkpoints", f"{fp}.ckpt")

    def save(self, epoch, model, opt, history):
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.store), exist_ok=True)
        save_torch({"fingerprint": self.fp, "complete": False, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(), "history": history,
                    "small_map_paths": self.small_map_paths}, self.store)
        self.saved = epoch  # resumable from here on, from the store at least
        replace_atomic(lambda tmp: shutil.copyfile(self.store, tmp), self.path)

    def load(self):
        """The newest matching unfinished checkpoint of the two places, and where it was."""
        found = [(ck, p) for p in (self.path, self.store)
                 if (ck := load_checkpoint(p, self.fp)) is not None] if self.path else []
        return max(found, key=lambda f: f[0]["epoch"], default=(None, None))

    def finish(self):
        """A finished run leaves a small marker at `path`, not a resumable state."""
        if self.path:
            save_torch({"fingerprint": self.fp, "complete": True}, self.path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.store)


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
    if not isinstance(ck, dict) or ck.get("fingerprint") != fp or ck.get("complete", True) \
            or not isinstance(ck.get("epoch"), int):
        return None
    return ck


def resume(ckpt, model_name, model, opt, paths):
    """Load a matching checkpoint into model and optimizer, and the small-map paths the run
    started with; returns (the epochs' history so far, the paths in force)."""
    ck, where = ckpt.load()
    if ck is None:
        return [], paths
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    saved = ck.get("small_map_paths")
    if isinstance(saved, dict) and all(isinstance(saved.get(k), list) for k in ("matmul", "conv")):
        apply_paths(model, saved)
        paths = saved
    print(f"resuming {model_name} from checkpoint {where} after epoch {ck['epoch']}")
    return ck["history"], paths


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
