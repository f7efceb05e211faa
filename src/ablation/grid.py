"""Grids of experiments: parse a grid file, queue its rows as DVC experiments.

    python -m ablation.grid queue grids/table3.yaml [--seeds N] [--dry-run] [--force]
                                 [--set KEY=VALUE ...] [--tag NAME]
    python -m ablation.grid show grids/table3.yaml        # rows and their override lists

A grid file (YAML):
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

A metric column names a key the stage records (params.METRICS or RECORD) and, where a row
runs several, which dataset and model (train) or kernel (svm); `stage:` is needed only when
`targets` does not say it. Every override and column is checked before anything is queued.

Identity: `--set` overrides make a variant of each row, named by `--tag` or by a short hash of
the overrides, so a smoke run never blocks or overwrites the real one. `queue` skips a run that
succeeded with the params it plans now, and re-queues (overwrites) one whose plan changed.
"""
import copy
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import yaml

from .cli import Parser, UserError, bounded, read_config, run
from .io import record_path
from .params import (
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
    validate,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # DVC experiment names: no '-' inside ids
SEED_RE = re.compile(r"^s[0-9]+$")
TARGET_RE = re.compile(r"^(prepare|train|svm)(@[A-Za-z0-9_.-]+)?$")  # a stage or matrix entry
STAGE_SECTIONS = {"train": ("data", "train"), "svm": ("svm",)}  # what a stage reads
WHICH = {"train": ("dataset", "model"), "svm": ("dataset", "kernel")}  # a metrics file's parts
LISTS = {"dataset": ("data", "datasets"), "model": ("train", "models"),
         "kernel": ("svm", "kernels")}


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


ID = text(NAME_RE, "letters, digits, '_' or '.' (no '-': it separates a name's parts)")
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
}
COLUMN_SCHEMA = {
    "label": text(), "param": lambda v: None if v in known(v) else
    f"allowed: a params.yaml key: {', '.join(known(v))}",
    "metric": text(), "fmt": fmt_spec, "stage": choice(tuple(STAGE_SECTIONS)),
    "dataset": choice(DATASETS), "model": choice(MODELS), "kernel": choice(KERNELS),
}
ROW_SCHEMA = {"id": ID, "set": mapping, "study": study_values}


def load(path, extra_set=None, params_path=PARAMS_FILE, tag=None):
    """Read and check a grid file; return it with `rows` expanded and each row's params.

    extra_set: `--set` overrides for every row; they make the runs a variant named `tag`
    (default: a hash of the overrides)."""
    g = check_fields(read_config(path), GRID_SCHEMA, path, required=("name",),
                     defaults={"title": None, "note": "", "set": {}, "columns": [], "extra": [],
                               "targets": [], "rows": None, "factorial": None})
    g["title"] = g["title"] or g["name"]
    labels = []
    for key in ("columns", "extra"):
        g[key] = [check_column(path, c, f"{key}[{i + 1}].", g["targets"])
                  for i, c in enumerate(g[key])]
        labels += [c["label"] for c in g[key]]
    dup = next((lb for lb in labels if labels.count(lb) > 1), None)
    if dup is not None:
        _fail(path, f"column label {bounded(repr(dup), 60)} twice: labels must be unique")
    if (g["rows"] is None) == (g["factorial"] is None):
        _fail(path, "give exactly one of 'rows' (a list) or 'factorial' (lists of values per key)")
    rows = g.get("rows") or [{"id": f"r{i + 1:02d}", "set": dict(zip(g["factorial"], combo))}
                             for i, combo in enumerate(itertools.product(
                                 *g["factorial"].values()))]
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
    g["extra_set"] = dict(extra_set or {})
    g["path"] = path
    if tag is not None and (not isinstance(tag, str) or not NAME_RE.match(tag)
                            or SEED_RE.match(tag)):
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
    return f"metrics/{'resnet' if col['stage'] == 'train' else 'svm'}/{'/'.join(parts)}.json"


def relevant_keys(grid):
    """The params ('section.key') the grid's runs depend on: those of its target stages and
    the datasets they run on; every param when targets is the whole pipeline."""
    stages = [t for t in grid["targets"] if t in STAGE_SECTIONS] or list(STAGE_SECTIONS)
    keys = {"data.datasets"}
    for st in stages:
        keys |= {f"{sec}.{k}" for sec in STAGE_SECTIONS[st] for k in SCHEMA[sec]}
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


def recorded_params(exp):
    """The params.yaml an experiment ran with, from `dvc exp show`; None for unfinished ones."""
    return (((exp or {}).get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data")


def read_params(params_path):
    """The params file as a mapping, unvalidated: rows override it, then it is validated."""
    p = read_config(params_path)
    if not isinstance(p, dict):
        raise UserError(f"{params_path}: expected a mapping of sections ({', '.join(SCHEMA)})")
    return p


def known(dotted=""):
    """What a parameter name may be: the keys of its section, or the sections."""
    sec = str(dotted).partition(".")[0]
    if sec in SCHEMA:
        return [f"{sec}.{k}" for k in SCHEMA[sec]]
    return [f"{s}.*" for s in SCHEMA]


def apply(base, overrides, where):
    """base params with `section.key` overrides applied and validated; UserError names the row."""
    p = copy.deepcopy(base)
    for dotted, value in overrides.items():
        sec, _, key = str(dotted).partition(".")
        if sec not in SCHEMA or key not in SCHEMA[sec]:
            raise UserError(f"{where}: unknown parameter {bounded(repr(dotted), 60)} "
                            f"(known: {', '.join(known(dotted))})")
        if not isinstance(p.get(sec), dict):
            raise UserError(f"{where}: params.yaml has no section '{sec}' to override")
        p[sec][key] = value
    try:
        return validate(p, list(SCHEMA), source="params.yaml")
    except UserError as e:
        raise UserError(f"{where}: {str(e).removeprefix('params.yaml: ')}") from None


def fmt_value(v):
    """A value in DVC's -S (Hydra override) syntax."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def exp_name(grid, row_id, seed=None, variant=None):
    return f"{grid['name']}-{row_id}" + (f"-{variant}" if variant else "") + \
        ("" if seed is None else f"-s{seed}")


def parse_name(grid, row_id, name):
    """(variant or None, seed or None) if `name` is a run of the row, else None."""
    base = f"{grid['name']}-{row_id}"
    if name == base:
        return None, None
    if not name.startswith(base + "-"):
        return None
    parts = name[len(base) + 1:].split("-")
    seed = int(parts.pop()[1:]) if SEED_RE.match(parts[-1]) else None
    if len(parts) > 1 or (parts and not NAME_RE.match(parts[0])):
        return None
    return (parts[0] if parts else None), seed


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


def plan(grid, seeds=None):
    """Every run of the grid: [{name, row, seed, params (planned), cmd (argument list)}]."""
    out = []
    for r in grid["rows"]:
        for seed in (range(seeds) if seeds else [None]):
            over = dict(r["overrides"])
            params = copy.deepcopy(r["params"])
            if seed is not None:
                over["train.seed"] = over["svm.seed"] = seed
                params["train"]["seed"] = params["svm"]["seed"] = seed
            name = exp_name(grid, r["id"], seed, grid["variant"])
            cmd = ["dvc", "exp", "run", "--queue", "-n", name]
            for k, v in over.items():
                cmd += ["-S", f"{k}={fmt_value(v)}"]
            out.append({"name": name, "row": r, "seed": seed, "params": params,
                        "cmd": cmd + list(grid["targets"])})
    return out


def dvc(args, **kw):
    """Run dvc with an argument list (never a shell); the venv's dvc if PATH lacks one."""
    exe = shutil.which("dvc") or os.path.join(os.path.dirname(sys.executable), "dvc")
    if not os.path.exists(exe):
        raise UserError("dvc not found: run `make test` or `make run` once to set up .venv")
    return subprocess.run([exe] + list(args), capture_output=True, text=True, **kw)


def experiments():
    """{name: {state, rev, data, ...}} of every experiment DVC knows (newest per name)."""
    r = dvc(["exp", "show", "--json", "--all-commits"])
    if r.returncode != 0:
        raise UserError(f"dvc exp show failed: {r.stderr.strip().splitlines()[-1:]}")
    out = parse_exp_show(json.loads(r.stdout or "[]"))
    attach_records(out.values())
    for name, rec in run_failures().items():  # failed under `grid run`: DVC never saw them
        if out.get(name, {}).get("state") != "success":
            out[name] = rec
    return out


MAX_RECORD_BYTES = 1 << 20  # a run record is under 1 KB; more is not one of ours


def attach_records(exps, cwd=None):
    """Add each finished run's record (<metrics>.run.json at its commit: environment, resolved
    switches) to its metrics, so columns and the report read both alike. Keys the metrics file
    already has win (runs made before the split recorded everything there). One `git cat-file
    --batch` for all; a missing, oversized or malformed record is left out."""
    wanted = [(e, path) for e in exps if e.get("rev") and e.get("data")
              for path in ((e["data"].get("metrics") or {}))]
    if not wanted:
        return
    query = "".join(f"{e['rev']}:{record_path(path)}\n" for e, path in wanted)
    try:
        r = subprocess.run(["git", "cat-file", "--batch"], input=query.encode(),
                           capture_output=True, cwd=cwd)
    except OSError as e:  # no git: the records stay unread, the metrics still show
        print(f"warning: run records not read ({e.strerror})", file=sys.stderr)
        return
    if r.returncode != 0:
        print(f"warning: run records not read: git cat-file: "
              f"{bounded(r.stderr.decode(errors='replace').strip(), 200)}", file=sys.stderr)
        return
    out, pos = r.stdout, 0
    for e, path in wanted:
        end = out.find(b"\n", pos)
        if end < 0:
            return
        header = out[pos:end].split()
        pos = end + 1
        if len(header) != 3 or not header[2].isdigit():  # "<rev:path> missing"
            continue
        size = int(header[2])
        body, pos = out[pos:pos + size], pos + size + 1
        try:
            rec = json.loads(body) if size <= MAX_RECORD_BYTES else None
        except ValueError:
            rec = None
        metrics = e["data"]["metrics"][path]
        if isinstance(rec, dict) and isinstance(metrics, dict) \
                and isinstance(metrics.get("data"), dict):
            for k, v in rec.items():
                metrics["data"].setdefault(k, v)


RUN_FAILURES = os.path.join(".dvc", "tmp", "grid-run")  # `grid run`'s failed runs: log + json


def run_failures():
    """{name: experiment-like record} of runs that failed under `grid run`."""
    out = {}
    if os.path.isdir(RUN_FAILURES):
        for fname in sorted(os.listdir(RUN_FAILURES)):
            if fname.endswith(".json"):
                name = fname[:-len(".json")]
                out[name] = {"state": "failed", "rev": None, "timestamp": "", "data": None,
                             "log": os.path.join(RUN_FAILURES, name + ".log")}
    return out


def parse_exp_show(doc):
    """Flatten `dvc exp show --json` into {name: {state, rev, data, timestamp}}."""
    out = {}
    for commit in doc:
        for e in commit.get("experiments") or []:
            ex = e.get("executor") or {}
            for rv in e.get("revs") or []:
                name = rv.get("name") or e.get("name")
                state = ex.get("state") or ("failed" if rv.get("error") else "success")
                if rv.get("error") and state == "success":
                    state = "failed"
                ts = (rv.get("data") or {}).get("timestamp") or ""
                if name in out and out[name]["timestamp"] >= ts:
                    continue
                out[name] = {"state": state, "rev": rv.get("rev"), "timestamp": ts,
                             "data": rv.get("data") if state == "success" else None,
                             "log": (ex.get("local") or {}).get("log")}
    return out


def to_run(grid, seeds, exps, force=False):
    """The runs of `grid` to start, each with `overwrite` (a finished experiment of its name
    is replaced): not those queued or running, nor those that succeeded with the params
    planned now (unless `force`). Prints why each run is skipped or re-run."""
    out, keys = [], relevant_keys(grid)
    for job in plan(grid, seeds):
        name = job["name"]
        e = exps.get(name) or {}
        state = e.get("state")
        if state in ("queued", "running"):
            print(f"skip {name}: already {state}")
            continue
        job["overwrite"] = False
        if state == "success":
            diff = differences(recorded_params(e), job["params"], keys)
            if not diff and not force:
                print(f"skip {name}: already success")
                continue
            why = "--force" if not diff else "plan changed since it ran: " + ", ".join(
                f"{k} {fmt_value(v)} -> {fmt_value(get(job['params'], k))}"
                for k, v in diff.items())
            print(f"re-run {name} ({why})")
            job["overwrite"] = True
        out.append(job)
    return out


def queue(grid, seeds=None, dry_run=False, force=False):
    """Queue every run of `grid` that has not succeeded with the params planned now and is not
    queued or running; `force` re-runs finished ones too. Returns the names queued."""
    exps = {} if dry_run else experiments()
    queued, jobs = [], to_run(grid, seeds, exps, force)
    for job in jobs:
        name, cmd = job["name"], job["cmd"]
        if job["overwrite"]:
            cmd = cmd[:4] + ["-f"] + cmd[4:]  # overwrite the finished experiment of this name
        print(" ".join(cmd))
        if not dry_run:
            r = dvc(cmd[1:])
            if r.returncode != 0:
                raise UserError(f"queueing {name} failed: {r.stderr.strip()[-500:]}")
        queued.append(name)
    if not dry_run:
        print(f"queued {len(queued)} experiment(s); start them with `dvc queue start -j 1`")
    if any(job["overwrite"] for job in jobs):
        print("note: an overwrite is `dvc exp run -f`, which runs every stage again, prepare "
              "included: offline, start the queue with DATA_MIRROR set")
    return queued


def error_line(text):
    """The one line that says why a run failed: the stage's own `error: ` line, else DVC's last
    `ERROR: ` line; bounded."""
    lines = text.splitlines()
    ours = [line.strip() for line in lines if line.startswith("error: ")]
    theirs = [line.strip() for line in lines if line.startswith("ERROR: ")]
    return (ours or theirs or ["no error line in the log"])[-1][:300]


def get(params, dotted):
    sec, _, key = dotted.partition(".")
    return params[sec][key]


def _parse_set(items):
    out = {}
    for s in items or []:
        k, eq, v = s.partition("=")
        if not eq:
            raise UserError(f"--set {bounded(repr(s), 100)}: expected KEY=VALUE, e.g. "
                            f"train.epochs=1")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise UserError(f"--set {bounded(repr(s), 100)}: the value is not YAML "
                            f"({bounded(getattr(e, 'problem', None) or e, 80)})") from None
    return out


def main(argv):
    ap = Parser(prog="python -m ablation.grid",
                description="Queue a grid file's rows as DVC experiments (queue), or run them "
                            "as Ray tasks across GPUs and machines (run).")
    ap.add_argument("command", choices=["queue", "run", "show"],
                    help="queue: add the runs to DVC's queue; run: run them on Ray; "
                         "show: print each run's overrides")
    ap.add_argument("grid", help="a grid file, e.g. grids/table3.yaml")
    ap.add_argument("--seeds", type=int, help="run each row N times with seed 0..N-1")
    ap.add_argument("--rows", nargs="+", metavar="ID",
                    help="only these rows (ids as in the grid file; default: every row)")
    ap.add_argument("--dry-run", action="store_true", help="queue: print the dvc commands only")
    ap.add_argument("--force", action="store_true",
                    help="re-run experiments that already succeeded with the same params")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override for every row (e.g. data.train_limit=500); makes a variant")
    ap.add_argument("--tag", help="the variant's name for --set runs (default: a hash of them)")
    ray = ap.add_argument_group("run (Ray)")
    ray.add_argument("--address", help="a running Ray cluster (ray start --head prints it); "
                                       "default: start a local one")
    ray.add_argument("--gpus-per-run", type=float,
                     help="GPUs per run (default: 1 where the cluster has GPUs, else 0); a "
                          "fraction packs runs on one GPU: 0.25 puts four on each")
    ray.add_argument("--cpus-per-run", type=int, default=1,
                     help="CPUs per run; also its thread count (default: %(default)s)")
    ray.add_argument("--git-remote", help="where tasks clone from and push experiments to "
                                          "(default: this repository, for one machine)")
    ray.add_argument("--dvc-remote", help="DVC remote URL for the tasks (default: the "
                                          "repository's default remote)")
    a = ap.parse_args(argv)
    if a.seeds is not None and a.seeds < 1:
        raise UserError(f"--seeds {a.seeds}: allowed: an integer >= 1")
    if a.tag is not None and not a.set:
        raise UserError("--tag names the variant that --set makes: give --set too")
    if a.cpus_per_run < 1:
        raise UserError(f"--cpus-per-run {a.cpus_per_run}: allowed: an integer >= 1")
    x = a.gpus_per_run  # Ray: whole GPUs above 1; a fraction packs floor(1/x) runs on a GPU
    if x is not None and not (x == 0 or (x.is_integer() and x >= 1) or 0.0001 <= x <= 0.5):
        raise UserError(f"--gpus-per-run {x:g}: allowed: 0, a whole number (1, 2, ...), or a "
                        "fraction 0.0001 to 0.5 that runs share (0.5: 2 per GPU, 0.25: 4)")
    g = select_rows(load(a.grid, _parse_set(a.set), tag=a.tag), a.rows, a.grid)
    if a.command == "show":
        for job in plan(g, a.seeds):
            print(job["name"], " ".join(job["cmd"][6:]))
        return
    if a.command == "run":
        from . import cluster
        results = cluster.main(g, a.seeds, a.force, a.address, a.gpus_per_run, a.cpus_per_run,
                               a.git_remote, a.dvc_remote)
        failed = [n for n, r in results.items() if r["state"] != "success"]
        if results:
            print(f"{len(results) - len(failed)} run(s) succeeded, {len(failed)} failed"
                  + (f" ({', '.join(failed)}): see python -m ablation.report" if failed else ""))
        return
    queue(g, a.seeds, a.dry_run, a.force)


if __name__ == "__main__":
    run(main)
