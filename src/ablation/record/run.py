"""A run: who it is (RunId, one format/parse pair) and what it recorded (Run).

An experiment of a grid row is named `<grid>-<row>[-<variant>][-s<seed>]`: ids never hold a
'-', a variant is never `s<number>`, so the name parses without the grid file. One stage run
inside it (a dataset and model of the train stage, a dataset and kernel of svm) adds DVC's own
name of a matrix entry: `table3-r01-s0:train@fashion_mnist-resnet18`.

A Run is what one experiment recorded, wherever it ran (a DVC experiment, the queue, a Ray
task, a GPU archive taken in): the params it ran with, each stage run's metrics with its record
(<metrics>.run.json: host, CPU or GPU, threads, resolved switches), its per-epoch curves, and
where it came from. `Run.from_dict` / `to_dict` read and write the JSON form kept in
reports/<grid>.json; every reader of runs goes through them.
"""
import dataclasses
import math
import re

from ablation.core.outputs import WHICH, metrics_path, parse_metrics_path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # a grid, row or variant: no '-' inside
SEED_RE = re.compile(r"^s[0-9]+$")
NAME_RULE = "letters, digits, '_' or '.' (no '-': it separates a name's parts)"
_UNIT_RE = re.compile(r"^(train|svm)@([A-Za-z0-9_]+)-([A-Za-z0-9_]+)$")
FINISHED = "success"


def valid_variant(tag):
    """Whether `tag` can name a variant: a name part that does not read as a seed."""
    return isinstance(tag, str) and bool(NAME_RE.match(tag)) and not SEED_RE.match(tag)


@dataclasses.dataclass(frozen=True, order=True)
class RunId:
    """A grid row's experiment (grid, row, variant, seed) and, optionally, one stage run in
    it (stage, dataset, model: the model or, for svm, the kernel)."""
    grid: str
    row: str
    variant: str | None = None
    seed: int | None = None
    stage: str | None = None
    dataset: str | None = None
    model: str | None = None

    @property
    def name(self):
        """The experiment's name: table3-r01, table3-r01-smoke-s2."""
        return "-".join([self.grid, self.row] + ([self.variant] if self.variant else [])
                        + ([] if self.seed is None else [f"s{self.seed}"]))

    def format(self):
        """The name, and the stage run where there is one: table3-r01-s0:train@mnist-resnet18."""
        if self.stage is None:
            return self.name
        return f"{self.name}:{self.stage}@{self.dataset}-{self.model}"

    @classmethod
    def parse(cls, text):
        """The RunId that `format` wrote as `text`; None where `text` is no such name (an
        experiment that no grid named, a stray file)."""
        name, colon, unit = str(text).partition(":")
        parts = name.split("-")
        seed = int(parts.pop()[1:]) if len(parts) > 2 and SEED_RE.match(parts[-1]) else None
        if not 2 <= len(parts) <= 3 or not all(NAME_RE.match(p) for p in parts[:2]) \
                or (len(parts) == 3 and not valid_variant(parts[2])):
            return None
        rid = cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None, seed)
        if not colon:
            return rid
        m = _UNIT_RE.match(unit)
        return rid.unit(*m.groups()) if m else None

    def unit(self, stage, dataset, model):
        """The stage run of this experiment on `dataset` with `model` (or kernel)."""
        return dataclasses.replace(self, stage=stage, dataset=dataset, model=model)

    @property
    def experiment(self):
        """This id without its stage run."""
        return dataclasses.replace(self, stage=None, dataset=None, model=None)

    @property
    def metrics(self):
        """The stage run's metrics JSON, as dvc.yaml names it (core.outputs)."""
        return metrics_path(self.stage, self.dataset, self.model)

    def of_row(self, grid, row):
        """Whether this is a run of row `row` of grid `grid` (names)."""
        return self.grid == grid and self.row == row


def is_number(v):
    """A finite int or float (bools are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# A timing is no measurement where other processes kept more than this many cores busy over a
# run's timed epochs (its record's other_load_cores, core.cores.Load): an idle 2-core machine
# reads 0.00-0.05 (DVC, sshd, the kernel), a test-suite worker beside the run 0.5-1.
LOAD_LIMIT = 0.25
TIMINGS = ("train_time_ms", "images_per_s", "data_wait_ms", "data_wait_pct", "eval_time_ms",
           "predict_time_ms")  # the metrics that move with what else the machine runs


def busy(values):
    """Whether a stage run's record (metrics and run record) says other processes loaded its
    machine past LOAD_LIMIT while it was timed; False where it does not say (older records)."""
    load = (values or {}).get("other_load_cores")
    return is_number(load) and load > LOAD_LIMIT


DERIVED = {  # metric keys computed from others of the same metrics file (params.DERIVED_METRICS)
    "data_wait_pct": lambda m: 100.0 * m["data_wait_ms"] / m["train_time_ms"]
    if is_number(m.get("data_wait_ms")) and is_number(m.get("train_time_ms"))
    and m["train_time_ms"] else None,
}


def metric(values, key):
    """One metric of a metrics file's values (derived ones computed); None where absent."""
    if not isinstance(values, dict):
        return None
    return DERIVED[key](values) if key in DERIVED else values.get(key)


def _d(x):
    return x if isinstance(x, dict) else {}


@dataclasses.dataclass(frozen=True)
class Run:
    """What one experiment recorded. `metrics`: {metrics path: values, its record merged in};
    `curves`: {metrics path: {epoch: test accuracy %}} where kept; `source`: where it ran when
    not under DVC here ({'kind': 'gpu-archive', ...}); `sources`: {metrics path: archive} for
    the stage runs a later archive brought; `log`: a failed run's log file."""
    name: str
    state: str
    rev: str | None = None
    timestamp: str = ""
    params: dict | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    curves: dict = dataclasses.field(default_factory=dict)
    source: dict = dataclasses.field(default_factory=dict)
    sources: dict = dataclasses.field(default_factory=dict)
    log: str | None = None

    @property
    def id(self):
        """Its RunId, or None for an experiment no grid named."""
        return RunId.parse(self.name)

    @property
    def finished(self):
        return self.state == FINISHED

    @property
    def imported(self):
        """Taken in from a GPU study archive, not run by DVC here."""
        return self.source.get("kind") == "gpu-archive"

    def values(self, path):
        """The values (metrics and record) of one stage run's metrics file; {} if absent."""
        return _d(self.metrics.get(path))

    def metric(self, path, key):
        return metric(self.metrics.get(path), key)

    def units(self):
        """{metrics path: (stage, dataset, model or kernel)} of the stage runs it recorded."""
        return {p: u for p in self.metrics if (u := parse_metrics_path(p))}

    def planned_units(self):
        """How many stage runs its params plan: datasets x models (train runs only)."""
        p = self.params or {}
        return len(_d(p.get("data")).get("datasets") or []) * \
            len(_d(p.get("train")).get("models") or [])

    def provenance(self, path):
        """Where one stage run ran, from its record: commit, host, device, CPU or GPU,
        threads, and how it was run (dvc, ray, gpu-archive)."""
        v = self.values(path)
        how = self.source.get("kind") or ("ray" if v.get("ray_node_id") else "dvc")
        return {"commit": self.rev or self.source.get("commit"), "host": v.get("host"),
                "device": v.get("device"), "device_name": v.get("device_name"),
                "threads": v.get("threads"), "how": how}

    @classmethod
    def from_dict(cls, name, e):
        """A Run from the JSON form: {state, rev, timestamp, source, log, data: {params:
        {params.yaml: {data}}, metrics: {path: {data}}, curves, sources}} (what `dvc exp show
        --json` gives, flattened; what reports/<grid>.json keeps)."""
        e = _d(e)
        data = _d(e.get("data"))
        params = _d(_d(data.get("params")).get("params.yaml")).get("data")
        metrics = {p: m["data"] for p, m in _d(data.get("metrics")).items()
                   if isinstance(m, dict) and isinstance(m.get("data"), dict)}
        curves = {p: {int(k): v for k, v in _d(c).items()} for p, c in
                  _d(data.get("curves")).items()}
        return cls(name=name, state=str(e.get("state") or "unknown"), rev=e.get("rev"),
                   timestamp=str(e.get("timestamp") or ""),
                   params=params if isinstance(params, dict) else None, metrics=metrics,
                   curves=curves, source=_d(e.get("source")), sources=_d(data.get("sources")),
                   log=e.get("log"))

    def to_dict(self):
        """The JSON form (from_dict's inverse) of a finished run."""
        data = {"params": {"params.yaml": {"data": self.params or {}}},
                "metrics": {p: {"data": v} for p, v in self.metrics.items()}}
        if self.curves:
            data["curves"] = {p: {str(k): v for k, v in c.items()} for p, c in
                              self.curves.items()}
        if self.sources:
            data["sources"] = dict(self.sources)
        return {"state": self.state, "rev": self.rev, "timestamp": self.timestamp,
                **({"source": self.source} if self.source else {}), "data": data}


def stage_parts(stage):
    """What names one stage run of `stage` besides its experiment: ('dataset', 'model')."""
    return WHICH[stage]
