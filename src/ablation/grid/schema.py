"""Grids of experiments: parse a grid file, plan its rows as DVC experiments. A grid file:

    name: table3                 # experiments are named <name>-<row id>[-<variant>][-s<seed>]
    title: ...                   # the report's heading
    targets: [train]             # DVC stages to run (optional; default: the whole pipeline)
    set: {data.datasets: [fashion_mnist]}      # overrides for every row
    columns:                     # the study's table, its columns in its order
      - {label: batch, param: train.batch_size}
      - {label: test acc %, metric: test_accuracy}            # the row's one dataset and model
      - {label: R50 acc %, metric: test_accuracy, dataset: mnist, model: resnet50}
    extra: [...]                 # columns the study lacked (same format)
    rows:
      - {id: r01, set: {train.batch_size: 16}, study: {test acc %: 92.07}}
    factorial: {train.lr: [0.001, 0.0001]}   # or: one row per combination of these values
    claims:                      # the study's claims the report tests on the runs (Conclusions)
      - {claim: RBF beats polynomial, rows: [rbf], vs: [poly], factor: svm.kernels,
         column: test acc %, expect: higher, margin: 0.5}   # or `than: 99` instead of `vs`
    search: {column: test acc %, trials: 8, margin: 0.5, ...}  # grid search: grid/space.py

A claim says what it compares, never the verdict: each row of `rows` against the row of `vs`
that differs from it in the `factor` params alone (seeds of one row are its replicates; rows
are never pooled), or the rows against the figure `than`, on one metric column; `expect`: the
study's claim, higher, lower, same, not higher or not lower. `margin` (column units): for
`same`, `not higher`, `not lower` (required) the largest difference (excess, shortfall) still
counted as such; for `higher` / `lower` the smallest worth finding (report.claims plans seeds).

A metric column names a key the stage records (params.METRICS or RECORD) and, where a row runs
several, which dataset and model (train) or kernel (svm); `stage:` only where `targets` does
not say it. Every override and column is checked before anything is queued. Identity:
`--set` overrides make a variant of each row, named by `--tag` or a short hash of them.
"""
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re

from ablation.core.cli import UserError, bounded, read_config
from ablation.core.outputs import LISTS, WHICH, metrics_path
from ablation.grid.space import check_search, check_space
from ablation.record.run import NAME_RE, NAME_RULE, RunId, valid_variant
from ablation.training.overrides import apply, fmt_value, get, known, read_params
from ablation.training.params import (
    DATASETS,
    DERIVED_METRICS,
    KERNELS,
    METRICS,
    MODELS,
    PARAMS_FILE,
    RECORD,
    SCHEMA,
    check_fields,
    choice,
    list_of_mappings,
    mapping,
    text,
)

SEARCH_ROW = re.compile(r"^t[0-9a-f]{6}$")  # a search's setting (search/trials.py row_id)
TARGET_RE = re.compile(r"^(prepare|train|svm)(@[A-Za-z0-9_.-]+)?$")  # a stage or matrix entry
# what a stage reads: whole sections, or one "section.key"
STAGE_SECTIONS = {"train": ("data", "train"), "svm": ("svm", "data.test_limit")}


def _fail(path, msg):
    raise UserError(f"{path}: {msg}")


def fmt_spec(v):
    try:
        format(1.5, v)
        return None if isinstance(v, str) else "allowed: a Python format spec such as .2f"
    except (ValueError, TypeError):
        return "allowed: a Python format spec such as .2f or ,.0f"


def study_values(v):
    if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                          and math.isfinite(x) for x in v.values()):
        return "allowed: a mapping of column label -> a number"


def factorial_values(v):
    if not isinstance(v, dict) or not v or not all(isinstance(x, list) and x for x in v.values()):
        return "allowed: a mapping of parameter -> non-empty list of values"


ID = text(NAME_RE, NAME_RULE)
GRID_SCHEMA = {
    "name": ID,  # prefixes experiment names
    "title": text(), "note": text(),
    "targets": lambda v: None if isinstance(v, list) and all(
        isinstance(t, str) and TARGET_RE.match(t) for t in v) else
    "allowed: a list of DVC stages (prepare, train, svm, or one of their matrix entries such "
    "as train@mnist-resnet18); empty: the whole pipeline",
    "set": mapping,
    "columns": list_of_mappings(), "extra": list_of_mappings(),
    "rows": list_of_mappings(nonempty=True), "factorial": factorial_values,
    "claims": list_of_mappings(),
    "search": mapping,  # grid/space.py
}
COLUMN_SCHEMA = {
    "label": text(), "param": lambda v: None if v in known(v) else
    f"allowed: a params.yaml key: {', '.join(known(v))}",
    "metric": text(), "fmt": fmt_spec, "stage": choice(tuple(STAGE_SECTIONS)),
    "dataset": choice(DATASETS), "model": choice(MODELS), "kernel": choice(KERNELS),
}
ROW_SCHEMA = {"id": ID, "set": mapping, "study": study_values}
EXPECT = ("higher", "lower", "same", "not higher", "not lower")  # rows against vs (or than)
NEEDS_MARGIN = {"same": ("difference", "the same"), "not higher": ("excess", "not higher"),
                "not lower": ("shortfall", "not lower")}


def row_ids(ids):
    def check(v):
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x in ids
                                                       for x in v) or len(set(v)) != len(v):
            return f"allowed: a non-empty list of distinct row ids of the grid: {', '.join(ids)}"
    return check


def figure(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "allowed: a number"


def load(path, extra_set=None, params_path=PARAMS_FILE, tag=None):
    """Read and check a grid file; return it with `rows` expanded and each row's params.

    extra_set: `--set` overrides for every row; they make the runs a variant named `tag`
    (default: a hash of the overrides)."""
    g = check_fields(read_config(path), GRID_SCHEMA, path, required=("name",),
                     defaults={"title": None, "note": "", "set": {}, "columns": [], "extra": [],
                               "targets": [], "rows": None, "factorial": None,
                               "claims": [], "search": None})
    g["title"] = g["title"] or g["name"]
    labels = []
    for key in ("columns", "extra"):
        g[key] = [check_column(path, c, f"{key}[{i + 1}].", g["targets"])
                  for i, c in enumerate(g[key])]
        labels += [c["label"] for c in g[key]]
    dup = next((lb for lb in labels if labels.count(lb) > 1), None)
    if dup is not None:
        _fail(path, f"column label {bounded(repr(dup), 60)} twice: labels must be unique")
    if g["rows"] is not None and g["factorial"] is not None or \
            g["rows"] is None and g["factorial"] is None and g["search"] is None:
        _fail(path, "give exactly one of 'rows' (a list) or 'factorial' (lists of values per key)"
                    ", or a 'search' with its space")
    rows = g["rows"] or [] if g["factorial"] is None else [
        {"id": f"r{i + 1:02d}", "set": dict(zip(g["factorial"], combo))}
        for i, combo in enumerate(itertools.product(*g["factorial"].values()))]
    base = read_params(params_path)
    metric_labels = {c["label"] for c in g["columns"] if "metric" in c}
    g["rows"] = []
    for i, r in enumerate(rows):
        r = check_fields(r, ROW_SCHEMA, path, f"rows[{i + 1}].", required=("id",),
                         defaults={"set": {}, "study": {}})
        if r["id"] in [x["id"] for x in g["rows"]]:
            _fail(path, f"rows[{i + 1}].id = {r['id']!r}: ids must be unique")
        unknown = sorted(set(r["study"]) - metric_labels, key=str)
        if unknown:
            _fail(path, f"row {r['id']}: study value for unknown column "
                        f"{bounded(repr(unknown[0]), 60)} (metric columns: "
                        f"{', '.join(sorted(metric_labels)) or 'none'})")
        r["overrides"] = {**g["set"], **r["set"], **(extra_set or {})}
        r["params"] = apply(base, r["overrides"], f"{path}: row {r['id']}")
        check_row_columns(path, r, g["columns"] + g["extra"])
        g["rows"].append(r)
    g["claims"] = check_claims(path, g)
    g["search"] = check_search(path, g)
    if g["search"]:
        check_space(path, g, base, extra_set, metric_file)
    g["extra_set"] = dict(extra_set or {})
    g["path"] = path
    if tag is not None and not valid_variant(tag):
        raise UserError(f"--tag {tag!r}: letters, digits, '_' or '.', not s<number>")
    g["variant"] = (tag or "x" + hashlib.sha256(json.dumps(
        g["extra_set"], sort_keys=True).encode()).hexdigest()[:6]) if g["extra_set"] else None
    return g


def check_column(path, c, where, targets):
    """One column: its fields, exactly one of param or metric; a metric column names a key its
    stage records and only the parts (dataset/model/kernel) that stage's files have."""
    c = check_fields(c, COLUMN_SCHEMA, path, where, required=("label",))
    if ("param" in c) == ("metric" in c):
        _fail(path, f"{where}label = {bounded(repr(c['label']), 60)}: give exactly one of "
                    f"'param' or 'metric'")
    if "param" in c:
        return c
    stage = c.get("stage") or ("train" if "model" in c else "svm" if "kernel" in c else None)
    if stage is None and len(set(targets) & set(STAGE_SECTIONS)) == 1:
        stage = next(t for t in targets if t in STAGE_SECTIONS)
    if stage is None:
        _fail(path, f"column '{c['label']}': name its stage (stage: train or svm), as "
                    f"targets does not say it")
    c["stage"] = stage
    allowed = METRICS[stage] + RECORD[stage] + DERIVED_METRICS[stage]
    if c["metric"] not in allowed:
        _fail(path, f"column '{c['label']}': unknown metric {bounded(repr(c['metric']), 100)} "
                    f"of stage {stage} (allowed: {', '.join(allowed)})")
    for w in ("dataset", "model", "kernel"):
        if w in c and w not in WHICH[stage]:
            _fail(path, f"column '{c['label']}': '{w}' does not apply to stage {stage}")
    return c


def check_claims(path, g):
    """Each claim: its text, the rows it compares (ids of the grid's rows) with `vs` (other rows)
    and the `factor` that tells them apart, or `than` (a figure), one of the grid's metric
    columns, what the study expected, and its `margin` (required: NEEDS_MARGIN)."""
    ids = [r["id"] for r in g["rows"]]
    labels = tuple(c["label"] for c in g["columns"] + g["extra"] if "metric" in c)
    params = tuple(k for k in relevant_keys(g) if not k.endswith(".seed"))
    schema = {"claim": text(), "rows": row_ids(ids), "vs": row_ids(ids), "than": figure,
              "column": choice(labels), "expect": choice(EXPECT), "factor": factor(params),
              "margin": margin}
    out = []
    for i, c in enumerate(g["claims"]):
        where = f"claims[{i + 1}]."
        c = check_fields(c, schema, path, where, required=("claim", "rows", "column", "expect"))
        name = f"{where}claim = {bounded(repr(c['claim']), 60)}"
        if ("vs" in c) == ("than" in c):
            _fail(path, f"{name}: give exactly one of 'vs' (row ids) or 'than' (a figure)")
        if both := [x for x in c["rows"] if x in c.get("vs", ())]:
            _fail(path, f"{where}vs = {bounded(repr(c['vs']), 80)}: row {both[0]} is on both "
                        f"sides (allowed: row ids not in {where}rows)")
        if "vs" in c and "factor" not in c:
            _fail(path, f"{name}: name the param(s) it tests in 'factor' (allowed: a list of "
                        f"{', '.join(params)}): each row must differ from its row in vs in "
                        f"these alone")
        if "than" in c and "factor" in c:
            _fail(path, f"{name}: 'factor' goes with 'vs' (rows against rows), not 'than'")
        if c["expect"] in NEEDS_MARGIN and "margin" not in c:
            what, such = NEEDS_MARGIN[c["expect"]]
            _fail(path, f"{name}: expect: {c['expect']} needs a margin (allowed: a number > 0, "
                        f"the largest {what} in {c['column']} that still counts as {such})")
        if isinstance(c.get("factor"), str):
            c["factor"] = [c["factor"]]
        out.append(c)
    return out


def factor(params):
    def check(v):
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v or not all(x in params for x in v) or \
                len(set(v)) != len(v):
            return f"allowed: a param or a list of distinct params of: {', '.join(params)}"
    return check


def margin(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        return "allowed: a number > 0, in the column's units"


def check_row_columns(path, r, columns):
    """Each metric column reads one file of the row: the row runs the dataset/model/kernel it
    names, or exactly one where it names none."""
    for c in columns:
        for w in WHICH.get(c.get("stage"), ()):
            ran = get(r["params"], ".".join(LISTS[w]))
            if w in c and c[w] not in ran:
                _fail(path, f"row {r['id']}: column '{c['label']}' reads {w} {c[w]}, which the "
                            f"row does not run ({w}s: {', '.join(ran)})")
            if w not in c and len(ran) != 1:
                _fail(path, f"row {r['id']}: column '{c['label']}' reads one {w} but the row "
                            f"runs {', '.join(ran)} (name one with {w}:)")


def metric_file(col, params):
    """The metrics file a metric column reads for a run with `params`, e.g.
    'metrics/resnet/mnist/resnet18.json'; None where the run ran several and the column does
    not say which, or not the one it names."""
    parts = []
    for w in WHICH[col["stage"]]:
        sec, key = LISTS[w]
        ran = (params.get(sec) or {}).get(key) or []
        if w in col:
            if col[w] not in ran:
                return None
            parts.append(col[w])
        elif len(ran) == 1:
            parts.append(ran[0])
        else:
            return None
    return metrics_path(col["stage"], *parts)


def relevant_keys(grid):
    """The params ('section.key') the grid's runs depend on: those of its target stages and
    the datasets they run on; every param when targets is the whole pipeline."""
    stages = [t for t in grid["targets"] if t in STAGE_SECTIONS] or list(STAGE_SECTIONS)
    keys = {"data.datasets"}
    for st in stages:
        keys |= {f"{sec}.{k}" if "." not in sec else sec for sec in STAGE_SECTIONS[st]
                 for k in (SCHEMA[sec] if "." not in sec else [None])}
    return sorted(keys)


def differences(recorded, planned, keys):
    """{'section.key': recorded value} where a run's recorded params differ from a plan, over
    `keys`; seeds are left out (they are the point of a seed run), and so are keys the record
    lacks (params added after it ran)."""
    out = {}
    for dotted in keys:
        sec, _, key = dotted.partition(".")
        rec = (recorded or {}).get(sec) or {}
        if key != "seed" and key in rec and rec[key] != planned[sec][key]:
            out[dotted] = rec[key]
    return out


def select_rows(grid, ids, path):
    """`grid` with only the rows `ids` (None: all), in the file's order."""
    if not ids:
        return grid
    known_ids = [r["id"] for r in grid["rows"]]
    unknown = [i for i in ids if i not in known_ids]
    if unknown:
        raise UserError(f"{path}: --rows {bounded(repr(unknown[0]), 60)}: no such row "
                        f"(allowed: {', '.join(known_ids)})")
    return dict(grid, rows=[r for r in grid["rows"] if r["id"] in ids])


@dataclasses.dataclass(frozen=True)
class Job:
    """One planned run of a grid row: its id, the row, the params it will run with, the
    overrides that make them (seed included), the stages to run; `overwrite`: a finished
    experiment of its name is replaced."""
    id: RunId
    row: dict
    params: dict
    overrides: dict
    targets: tuple = ()
    overwrite: bool = False

    @property
    def name(self):
        return self.id.name

    @property
    def seed(self):
        return self.id.seed

    def runs_stage(self, stage):
        """Whether the run runs `stage` (targets empty: the whole pipeline)."""
        return not self.targets or any(t.split("@")[0] == stage for t in self.targets)

    def dvc_args(self):
        """What `dvc exp run -n NAME` takes after the name: -S overrides, then targets."""
        out = []
        for k, v in self.overrides.items():
            out += ["-S", f"{k}={fmt_value(v)}"]
        return out + list(self.targets)

    def queue_args(self):
        """What `dvc` takes to queue it: `exp run --queue` (-f where it overwrites)."""
        return ["exp", "run", "--queue"] + (["-f"] if self.overwrite else []) + \
            ["-n", self.name] + self.dvc_args()

    def queue_cmd(self):
        """The `dvc exp run --queue` command that queues it, as printed."""
        return ["dvc"] + self.queue_args()


def plan(grid, seeds=None):
    """Every run of the grid, as Jobs, in the file's order (seeds 0..N-1 per row)."""
    out = []
    for r in grid["rows"]:
        for seed in (range(seeds) if seeds else [None]):
            over = dict(r["overrides"])
            params = copy.deepcopy(r["params"])
            if seed is not None:
                over["train.seed"] = over["svm.seed"] = seed
                params["train"]["seed"] = params["svm"]["seed"] = seed
            rid = RunId(grid["name"], r["id"], grid["variant"], seed)
            out.append(Job(rid, r, params, over, tuple(grid["targets"])))
    return out


def runs_of_row(grid, row_id, runs):
    """{name: run} of `runs` ({name: anything}) that are experiments of the grid's row."""
    return {n: e for n, e in runs.items()
            if (rid := RunId.parse(n)) is not None and rid.stage is None
            and rid.of_row(grid["name"], row_id)}


def variants_of(grid, name):
    """The variants (None: as planned) that experiment `name` is a run of, over the grid's
    rows; empty if it is no run of the grid."""
    rid = RunId.parse(name)
    if rid is None or rid.stage is not None or rid.grid != grid["name"]:
        return set()
    ours = any(r["id"] == rid.row for r in grid["rows"]) or \
        grid.get("search") and SEARCH_ROW.match(rid.row)  # a search's setting
    return {rid.variant} if ours else set()
