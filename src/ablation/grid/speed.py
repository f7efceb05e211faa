"""Where a forecast's speeds come from: images per second of a model at a batch size.

  record       this machine's finished runs (live DVC experiments and the committed
               reports/*.json): same CPU name, model, batch size, stem and thread count (where
               the run recorded one); the median over runs, each measurement counted once (DVC
               shows a parent's metrics files in an experiment: only the stage runs of the
               run's own datasets, models and target stages count);
  calibration  measured now: WARMUP then TIMED training steps on random 28x28 uint8 images
               with the run's switches, then one evaluation batch; nothing is written (the
               small-map choices are read from a copy of the tuning cache, new ones dropped);
  GPU record   our finished cuda runs of the model and batch size, any GPU;
  study GPU    the study's GPU train times where the grid file holds them (`study:` values of
               a train_time_ms column in rows planned for cuda): img/s = train images x epochs /
               time; training only, the study timed no evaluation.
An svm fit: the median recorded train_time_ms of the kernel at train_samples on this machine.
"""
import contextlib
import dataclasses
import glob
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import NamedTuple

from ablation.core.cli import UserError, read_config
from ablation.core.outputs import metrics_path, parse_metrics_path
from ablation.grid.schema import metric_file
from ablation.record import store
from ablation.record.run import RunId, is_number
from ablation.training.datasets import DATASETS

REPORTS = "reports"
GRIDS = "grids"
WARMUP, TIMED = 2, 5  # calibration: training steps run first, then timed
CUDA = "cuda"


class Unit(NamedTuple):
    """One stage run of a job: stage, dataset, model (train) or kernel (svm)."""
    stage: str
    dataset: str
    name: str

    @property
    def path(self):
        return metrics_path(self.stage, self.dataset, self.name)


class Key(NamedTuple):
    """What a train speed depends on: model, batch size, stem, threads (None on a GPU)."""
    model: str
    batch_size: int
    stem: str
    threads: int | None

    def text(self):
        return f"{self.model} bs {self.batch_size}" + (
            f" {self.stem} stem" if self.stem != "imagenet" else "") + (
            f", {self.threads} thr" if self.threads else "")


@dataclasses.dataclass(frozen=True)
class Speed:
    """Images per second of one Key: training, evaluation (None: not known), where from."""
    train_ips: float
    eval_ips: float | None
    source: str  # record | calibration | GPU record | study GPU
    detail: str


def images(data, dataset):
    """(train, test) images a run uses per epoch: the limits, else the splits' sizes."""
    sizes = DATASETS[dataset]["sizes"]
    return data.get("train_limit") or sizes["train"], data.get("test_limit") or sizes["test"]


def this_machine():
    """This CPU's name as a run records it (training.engine.device_name)."""
    import torch

    from ablation.training.engine import device_name
    return device_name(torch.device("cpu"))


def recorded_runs(live):
    """{name: finished Run}: every committed record reports/*.json, the live runs over them."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(REPORTS, "*.json"))):
        if not path.endswith(".forecast.json"):
            runs.update(store.load(path))
    return {**runs, **{n: r for n, r in live.items() if r.finished}}


def stages_ran(name, cache):
    """The stages a run of grid `name` ran (its grid file's targets), None where not known."""
    if name not in cache:
        path = os.path.join(GRIDS, f"{name}.yaml")
        try:
            targets = read_config(path).get("targets") if os.path.isfile(path) else None
        except (UserError, AttributeError):
            targets = None
        cache[name] = {str(t).partition("@")[0] for t in targets} if targets else None
    return cache[name]


def measurements(runs):
    """[(run name, Unit, params, values)] of each stage run the runs recorded themselves: of
    their params' datasets and models, of their grid's target stages (DVC shows a parent's
    files too), one copy of each measurement."""
    out, seen, cache = [], set(), {}
    for name, run in sorted(runs.items()):
        p, rid = run.params or {}, RunId.parse(name)
        ran = stages_ran(rid.grid, cache) if rid else None
        for path, (stage, ds, n) in sorted(run.units().items()):
            lists = ((p.get("data") or {}).get("datasets") or [],
                     (p.get("train" if stage == "train" else "svm") or {}).get(
                         "models" if stage == "train" else "kernels") or [])
            v = run.values(path)
            key = (path, v.get("train_time_ms"), v.get("eval_time_ms"))
            if ds in lists[0] and n in lists[1] and (ran is None or stage in ran) \
                    and key not in seen:
                seen.add(key)
                out.append((name, Unit(stage, ds, n), p, v))
    return out


def train_speed(unit, p, v):
    """(train img/s, eval img/s) one finished, solo, undiverged train run recorded; None."""
    ips, eval_ms, epochs = v.get("images_per_s"), v.get("eval_time_ms"), v.get("epochs_completed")
    if not (is_number(ips) and ips > 0 and is_number(eval_ms) and eval_ms > 0
            and is_number(epochs) and epochs >= 1) or v.get("diverged") is True \
            or v.get("packing") not in (None, "solo"):
        return None
    test_n = v.get("test_images") or images(p.get("data") or {}, unit.dataset)[1]
    return ips, test_n * epochs / (eval_ms / 1000)


def median_speed(found, source, where):
    """A Speed from [(run name, (train ips, eval ips), device)]: the medians, runs named."""
    names = [n for n, *_ in found]
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
    detail = f"recorded run {names[0]}" if len(names) == 1 else \
        f"median of {len(names)} recorded runs ({shown})"
    return Speed(statistics.median(s[0] for _, s, _ in found),
                 statistics.median(s[1] for _, s, _ in found), source, f"{detail} on {where}")


class Speeds:
    """Where each figure comes from for one forecast; remembers the speeds it used."""

    def __init__(self, grid, runs, threads, calibrate=None):
        self.machine, self.threads, self.used = this_machine(), threads, {}
        self.found = measurements(runs)
        self.study = study_speeds(grid)
        self.calibrate = calibrate or calibration
        self.memo = {}

    def _train(self, key, gpu):
        """[(run name, (train ips, eval ips), device name)] of the matching train runs: on a
        GPU any cuda run; else this CPU at the thread count (where the run recorded one)."""
        out = []
        for name, u, p, v in self.found:
            t = p.get("train") or {}
            if u.stage != "train" or u.name != key.model or t.get("batch_size") != \
                    key.batch_size or t.get("stem", "imagenet") != key.stem:
                continue
            here = v.get("device") == "cpu" and v.get("device_name") == self.machine and \
                v.get("threads") in (None, key.threads)
            if (v.get("device") == CUDA if gpu else here) and (s := train_speed(u, p, v)):
                out.append((name, s, v.get("device_name") or "?"))
        return out

    def cpu(self, key, train_cfg):
        """This machine's Speed for `key`: recorded, else calibrated now."""
        if key not in self.memo:
            found = self._train(key, gpu=False)
            self.memo[key] = median_speed(found, "record", self.machine) if found else \
                Speed(*self.calibrate(key, train_cfg), "calibration",
                      f"measured now on {self.machine}: {WARMUP} warm-up + {TIMED} timed "
                      f"steps, one eval batch")
        self.used[("CPU", key)] = self.memo[key]
        return self.memo[key]

    def gpu(self, key):
        """A GPU Speed for `key` (no threads): our cuda runs, else the study's; None."""
        key = key._replace(threads=None)
        found = self._train(key, gpu=True)
        s = median_speed(found, "GPU record", ", ".join(sorted({d for *_, d in found}))) \
            if found else self.study.get(key)
        if s:
            self.used[("GPU", key)] = s
        return s

    def svm_ms(self, unit, samples):
        """(median fit ms, detail) of `unit`'s kernel at `samples` on this machine; None."""
        found = [(n, v["train_time_ms"]) for n, u, p, v in self.found
                 if u.stage == "svm" and u.name == unit.name and is_number(v.get(
                     "train_time_ms")) and (v.get("train_samples") or (p.get("svm") or {}).get(
                         "train_samples")) == samples and self.here(v)]
        if not found:
            return None
        self.used[("svm", (unit.name, samples))] = f"median of {len(found)} recorded fit(s)"
        return statistics.median(ms for _, ms in found)

    def here(self, v):
        """Whether a record names this machine (its CPU name, else its host)."""
        if v.get("device_name"):
            return v["device_name"] == self.machine
        return bool(v.get("host")) and v["host"] == socket.gethostname()


def study_speeds(grid):
    """{Key: Speed} from the study's train times of the grid's rows planned for cuda:
    img/s = train images x epochs / (train time ms / 1000); the median over rows."""
    per = {}
    cols = [c for c in grid["columns"] + grid["extra"] if c.get("metric") == "train_time_ms"]
    for r in grid["rows"]:
        t = r["params"]["train"]
        for c in cols:
            ms, f = r["study"].get(c["label"]), metric_file(c, r["params"])
            if t["device"] != CUDA or not is_number(ms) or ms <= 0 or f is None:
                continue
            _, ds, model = parse_metrics_path(f)
            n = images(r["params"]["data"], ds)[0] * t["epochs"]
            per.setdefault(Key(model, t["batch_size"], t["stem"], None), []).append(
                (r["id"], n / (ms / 1000)))
    return {k: Speed(statistics.median(s for _, s in v), None, "study GPU",
                     f"the study's GPU train time of row(s) {', '.join(i for i, _ in v)} "
                     f"(training only)") for k, v in per.items()}


@contextlib.contextmanager
def scratch_cache():
    """ABLATION_CACHE_DIR pointed at a temporary copy of the small-map tuning cache: choices
    measured before are read, new ones vanish with it."""
    from ablation.training.smallmaps import cache_dir
    src, old = os.path.join(cache_dir(), "smallmaps.json"), os.environ.get("ABLATION_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="ablation-forecast-") as d:
        if os.path.isfile(src):
            shutil.copy(src, d)
        os.environ["ABLATION_CACHE_DIR"] = d
        try:
            yield
        finally:
            if old is None:
                del os.environ["ABLATION_CACHE_DIR"]
            else:
                os.environ["ABLATION_CACHE_DIR"] = old


def calibration(key, train_cfg):
    """(train img/s, eval img/s) of `key` on this CPU, measured now with the run's switches
    (device cpu): WARMUP then TIMED training steps, then one eval batch (EVAL_BATCH)."""
    import torch

    from ablation.training import engine
    cfg, device = {**train_cfg, "device": "cpu", "seed": 0}, torch.device("cpu")
    sw, bs, old = engine.resolve_switches(cfg, device), key.batch_size, torch.get_num_threads()
    torch.set_num_threads(key.threads)
    try:
        with scratch_cache():
            model, step_model, opt, _ = engine.setup_model(key.model, cfg, device, sw)
        ctx = engine.RunContext(device, 0.5, 0.25, sw["channels_last"], sw["precision"] == "bf16")
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, ((WARMUP + TIMED) * bs, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (len(x),), generator=g)
        steps = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
        engine.train_one_epoch(step_model, opt, iter(steps[:WARMUP]), ctx)
        loop_s = engine.train_one_epoch(step_model, opt, iter(steps[WARMUP:]), ctx)[3]
        xe = torch.randint(0, 256, (engine.EVAL_BATCH, 28, 28), dtype=torch.uint8, generator=g)
        engine.evaluate(model, xe[:bs], torch.zeros(bs, dtype=torch.long), ctx)  # warm-up
        t0 = time.perf_counter()
        engine.evaluate(model, xe, torch.zeros(len(xe), dtype=torch.long), ctx)
        eval_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return TIMED * bs / loop_s, len(xe) / eval_s
