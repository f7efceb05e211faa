"""What a grid's runs would cost, in hours, before they run, and from which measured speed.

A train stage run costs epochs x (train images / train img/s + test images / eval img/s), with
train images = data.train_limit or the split's size (60,000) and test images = data.test_limit
or 10,000; the speeds are grid/speed.py's (this machine's records, else a calibration measured
now; for a run planned for cuda, GPU figures beside them). An svm stage run costs its recorded
fit time on this machine, else it has no estimate. Not counted: prepare, DVC's own time, the
small-map tuning.

`grid queue` saves what it forecast to reports/<grid>.forecast.json (runs, hours, the machine,
the sources, the date); `python -m ablation.report` sets it against what the runs recorded.
"""
import dataclasses
import datetime
import json
import os
import socket

from ablation.core.cli import UserError, bounded
from ablation.core.io import write_json
from ablation.grid.schema import STAGE_SECTIONS
from ablation.grid.speed import CUDA, REPORTS, Key, Speeds, Unit, images, recorded_runs
from ablation.record.run import is_number


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One run's forecast: hours on this CPU and (planned for cuda) from GPU figures; None
    where a stage run has no estimate; the sources each figure came from."""
    name: str
    what: str
    units: tuple
    hours: float | None
    source: str
    gpu: bool = False
    gpu_hours: float | None = None
    gpu_source: str = ""
    threads: int | None = None


def units_of(job):
    """The stage runs a job runs: its targets' (every stage where none) datasets x models or
    kernels, or the one matrix entry a target such as train@mnist-resnet18 names."""
    p, out = job.params, []
    for t in job.targets or tuple(STAGE_SECTIONS):
        stage, _, entry = t.partition("@")
        if stage not in STAGE_SECTIONS:
            continue
        names = p["train"]["models"] if stage == "train" else p["svm"]["kernels"]
        out += [Unit(stage, d, n) for d in p["data"]["datasets"] for n in names
                if not entry or entry == f"{d}-{n}"]
    return tuple(dict.fromkeys(out))


def unit_hours(unit, p, speed):
    """Hours of one train stage run at `speed`: epochs x (train / train img/s + test / eval
    img/s); training only where the eval speed is not known."""
    train_n, test_n = images(p["data"], unit.dataset)
    s = train_n / speed.train_ips + (test_n / speed.eval_ips if speed.eval_ips else 0.0)
    return p["train"]["epochs"] * s / 3600


def describe(job, units):
    p = job.params
    parts = []
    for stage in dict.fromkeys(u.stage for u in units):
        us = [u for u in units if u.stage == stage]
        ds = "+".join(dict.fromkeys(u.dataset for u in us))
        names = "+".join(dict.fromkeys(u.name for u in us))
        parts.append(f"{ds} x {names}, {p['train']['epochs']} ep, bs {p['train']['batch_size']}"
                     if stage == "train" else f"svm {ds} x {names}, "
                                              f"{p['svm']['train_samples']} samples")
    return "; ".join(parts) or "nothing timed (prepare)"


def added(hs):
    """The sum of hours, None where one is None."""
    return None if None in hs else sum(hs)


def estimate(job, speeds, threads):
    """The Estimate of one job: its train and svm stage runs at the speeds found."""
    p, units = job.params, units_of(job)
    key = Key(None, p["train"]["batch_size"], p["train"]["stem"], threads)
    gpu = p["train"]["device"] == CUDA
    cpu_h, gpu_h, src, gsrc = [], [], [], []  # hours per stage run (None: no estimate)
    for u in units:
        if u.stage == "train":
            k = key._replace(model=u.name)
            s = speeds.cpu(k, p["train"])
            cpu_h, src = cpu_h + [unit_hours(u, p, s)], src + [s.source]
            g = speeds.gpu(k) if gpu else None
            gpu_h.append(unit_hours(u, p, g) if g else None)
            gsrc.append(g.source if g else "no GPU run on record" + (
                "" if speeds.study else ", no study GPU timing in the grid"))
        else:  # the svm stage runs on the CPU wherever train runs
            ms = speeds.svm_ms(u, p["svm"]["train_samples"])
            cpu_h.append(None if ms is None else ms / 3.6e6)
            gpu_h.append(cpu_h[-1])
            src.append("svm record" if ms is not None else "no estimate")
            gsrc.append(src[-1])
    return Estimate(job.name, describe(job, units), tuple(u.path for u in units), added(cpu_h),
                    ", ".join(dict.fromkeys(src)) or "—", gpu, added(gpu_h) if gpu else None,
                    ", ".join(dict.fromkeys(gsrc)) if gpu else "", threads)


def forecast(grid, jobs, live, threads, calibrate=None):
    """(Estimates of `jobs`, the Speeds used), from the records and `live` ({name: Run});
    `threads`: {job name: the threads it computes with}."""
    speeds = Speeds(grid, recorded_runs(live), sorted(set(threads.values())), calibrate)
    return [estimate(j, speeds, threads[j.name]) for j in jobs], speeds


def hours(h, none="no estimate"):
    """Hours as printed: two decimals, three digits under 0.1 h (a smoke run's seconds)."""
    return none if h is None else f"{h:.2f}" if h >= 0.1 else f"{h:.3g}"


def total(ests, attr, none="no estimate"):
    """The sum of the runs' hours; those without an estimate counted apart."""
    hs = [getattr(e, attr) for e in ests]
    missing = sum(h is None for h in hs)
    if hs and missing == len(hs):
        return none
    return f"{sum(h for h in hs if h is not None):.2f}" + (
        f" (+{missing} run(s) without an estimate)" if missing else "")


def report(ests, speeds, skipped=()):
    """Print the forecast: one line per run, the total, then where each speed came from."""
    gpu = any(e.gpu for e in ests)
    print(f"forecast on {speeds.machine}, {'/'.join(map(str, speeds.threads)) or '-'} "
          f"thread(s) per run (hours):")
    head = ["run", "what it runs", "CPU h", "source"] + (["GPU h", "source"] if gpu else [])
    rows = [[e.name, e.what, hours(e.hours), e.source]
            + ([hours(e.gpu_hours, "—"), e.gpu_source or "—"] if gpu else []) for e in ests]
    rows.append(["total", f"{len(ests)} run(s) to run, {len(skipped)} skipped",
                 total(ests, "hours"), ""] + ([total([e for e in ests if e.gpu], "gpu_hours",
                                                     "—"), ""] if gpu else []))
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for (where, key), s in speeds.used.items():
        if where == "svm":
            print(f"  svm {key[0]} {key[1]} samples: {s} on {speeds.machine}")
            continue
        ev = f", eval {s.eval_ips:.0f} img/s" if s.eval_ips else ""
        print(f"  {where} {key.text()}: train {s.train_ips:.0f} img/s{ev} [{s.source}: "
              f"{s.detail}]")
    if skipped:
        print(f"skipped (recorded or in the queue): {', '.join(skipped)}")


MAX_SOURCES = 40  # the measured speeds a forecast file names; older ones drop off


def path_of(grid_name, folder=REPORTS):
    return os.path.join(folder, f"{grid_name}.forecast.json")


def save(grid, ests, speeds, folder=REPORTS):
    """Write the forecast to reports/<grid>.forecast.json; runs forecast before and not now
    are kept."""
    path = path_of(grid["name"], folder)
    old = load(path)
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    runs = {**old.get("runs", {}), **{e.name: {
        "what": e.what, "units": list(e.units), "hours": e.hours, "source": e.source,
        "gpu_hours": e.gpu_hours, "gpu_source": e.gpu_source or None, "date": when,
        "machine": speeds.machine, "threads": e.threads} for e in ests}}
    sources = [bounded(f"{w} {k.text() if w != 'svm' else ' '.join(map(str, k))}: "
                       f"{s if isinstance(s, str) else s.source + ': ' + s.detail}", 300)
               for (w, k), s in speeds.used.items()]
    # the speeds earlier runs were forecast from stay named beside today's (newest first)
    old_sources = old.get("sources") if isinstance(old.get("sources"), list) else []
    sources = list(dict.fromkeys(sources + [bounded(str(x), 300) for x in old_sources]))[
        :MAX_SOURCES]
    write_json({"grid": grid["name"], "date": when, "machine": speeds.machine,
                "host": socket.gethostname(), "threads": speeds.threads,
                "sources": sources, "runs": runs}, path)
    return path


def load(path):
    """A forecast file as saved; {} where there is none; anything else is one UserError."""
    if not os.path.exists(path):
        return {}

    def bad(what):
        raise UserError(f"{bounded(path)}: not a forecast file: {what} (allowed: what `grid "
                        f"queue` writes; delete it and queue again)")
    try:
        with open(path) as f:
            doc = json.loads(f.read(1 << 22))
    except (OSError, ValueError, RecursionError) as e:
        bad(type(e).__name__)
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, dict):
        bad("expected {\"runs\": {name: forecast}}")
    for name, r in runs.items():
        if not (isinstance(r, dict) and (r.get("hours") is None or is_number(r.get("hours")))
                and isinstance(r.get("units"), list) and all(isinstance(u, str) for u in
                                                             r["units"])):
            bad(f"run {bounded(repr(name), 60)}: needs hours (a number or null) and units "
                f"(a list of metrics files)")
    return doc
