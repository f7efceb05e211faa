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

A metric column names a key the stage records (params.METRICS) and, where a row runs several,
which dataset and model (train) or kernel (svm); `stage:` is needed only when `targets` does not
say it. Every override and column is checked before anything is queued.

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

from . import params as P
from .cli import Parser, UserError, bounded, read_yaml, run

GRID_KEYS = {"name", "title", "targets", "set", "columns", "extra", "rows", "factorial", "note"}
ROW_KEYS = {"id", "set", "study"}
COLUMN_KEYS = {"label", "param", "metric", "fmt", "stage", "dataset", "model", "kernel"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # DVC experiment names: no '-' inside ids
SEED_RE = re.compile(r"^s[0-9]+$")
STAGE_SECTIONS = {"train": ("data", "train"), "svm": ("svm",)}  # what a stage reads
WHICH = {"train": ("dataset", "model"), "svm": ("dataset", "kernel")}  # a metrics file's parts
LISTS = {"dataset": ("data", "datasets"), "model": ("train", "models"),
         "kernel": ("svm", "kernels")}


def _fail(path, msg):
    raise UserError(f"{path}: {msg}")


def load(path, extra_set=None, params_path=P.PARAMS_FILE, tag=None):
    """Read and check a grid file; return it with `rows` expanded and each row's params.

    extra_set: `--set` overrides for every row; they make the runs a variant named `tag`
    (default: a hash of the overrides)."""
    g = read_yaml(path)
    if not isinstance(g, dict):
        _fail(path, f"expected a mapping with keys {', '.join(sorted(GRID_KEYS))}")
    unknown = [k for k in g if k not in GRID_KEYS]
    if unknown:
        _fail(path, f"unknown key {bounded(repr(unknown[0]), 60)} (allowed: "
                    f"{', '.join(sorted(GRID_KEYS))})")
    if not isinstance(g.get("name"), str) or not NAME_RE.match(g["name"]):
        _fail(path, "name: required, letters, digits, '_' or '.' (it prefixes experiment names)")
    for key, default in (("title", g["name"]), ("note", ""), ("set", {}), ("columns", []),
                         ("extra", []), ("targets", [])):
        if g.get(key) is None:
            g[key] = default
    for key in ("title", "note"):
        if not isinstance(g[key], str):
            _fail(path, f"{key}: a text, got {type(g[key]).__name__}")
    if not isinstance(g["set"], dict):
        _fail(path, f"set: a mapping of parameter -> value, got {type(g['set']).__name__}")
    if not isinstance(g["targets"], list) or not all(isinstance(t, str) for t in g["targets"]):
        _fail(path, "targets: a list of DVC stage names")
    labels = set()
    for key in ("columns", "extra"):
        if not isinstance(g[key], list):
            _fail(path, f"{key}: a list of {{label, param|metric}} mappings")
        for c in g[key]:
            if not isinstance(c, dict) or set(c) - COLUMN_KEYS or "label" not in c \
                    or (("param" in c) == ("metric" in c)):
                _fail(path, f"{key}: bad column {bounded(c)}: needs 'label' and exactly one "
                            f"of 'param' or 'metric' (keys: {', '.join(sorted(COLUMN_KEYS))})")
            if not isinstance(c["label"], str) or c["label"] in labels:
                _fail(path, f"{key}: column label {bounded(repr(c['label']), 60)}: a text, "
                            f"unique among the columns")
            labels.add(c["label"])
            if not isinstance(c.get("fmt", ""), str) or not valid_fmt(c.get("fmt", "")):
                _fail(path, f"column '{c['label']}': fmt {bounded(repr(c['fmt']), 60)}: a "
                            f"Python format spec such as .2f or ,.0f")
            if "param" in c:
                sec, _, k = str(c["param"]).partition(".")
                if sec not in P.SCHEMA or k not in P.SCHEMA[sec]:
                    _fail(path, f"column '{c['label']}': unknown param "
                                f"{bounded(repr(c['param']), 60)} (known: "
                                f"{', '.join(known(c['param']))})")
            else:
                check_metric_column(path, c, g["targets"])
    rows = g.get("rows")
    fact = g.get("factorial")
    if (rows is None) == (fact is None):
        _fail(path, "give exactly one of 'rows' (a list) or 'factorial' (lists of values per key)")
    if fact is not None:
        if not isinstance(fact, dict) or not fact or \
                not all(isinstance(v, list) and v for v in fact.values()):
            _fail(path, "factorial: a mapping of parameter -> non-empty list of values")
        keys = list(fact)
        rows = [{"id": f"r{i + 1:02d}", "set": dict(zip(keys, combo))}
                for i, combo in enumerate(itertools.product(*fact.values()))]
    if not isinstance(rows, list) or not rows:
        _fail(path, "rows: a non-empty list")
    base = _read_params(params_path)
    seen = set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or set(r) - ROW_KEYS:
            _fail(path, f"row {i + 1}: a mapping with keys {', '.join(sorted(ROW_KEYS))}")
        rid = r.get("id")
        if not isinstance(rid, str) or not NAME_RE.match(rid) or rid in seen:
            _fail(path, f"row {i + 1}: id {rid!r} must be unique, letters, digits, '_' or '.'")
        seen.add(rid)
        r["set"] = {} if r.get("set") is None else r["set"]
        r["study"] = {} if r.get("study") is None else r["study"]
        if not isinstance(r["set"], dict) or not isinstance(r["study"], dict):
            _fail(path, f"row {rid}: 'set' and 'study' must be mappings")
        ours = {c["label"] for c in g["columns"] if "metric" in c}
        for label, v in r["study"].items():
            if label not in ours:
                _fail(path, f"row {rid}: study value for unknown column "
                            f"{bounded(repr(label), 60)} (metric columns: "
                            f"{', '.join(sorted(ours))})")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                _fail(path, f"row {rid}: study value {bounded(repr(v), 60)} for '{label}': "
                            f"a number")
        r["overrides"] = {**g["set"], **r["set"], **(extra_set or {})}
        r["params"] = apply(base, r["overrides"], f"{path}: row {rid}")
        for c in g["columns"] + g["extra"]:
            for w in WHICH.get(c.get("stage"), ()):
                ran = get(r["params"], ".".join(LISTS[w]))
                if w in c and c[w] not in ran:
                    _fail(path, f"row {rid}: column '{c['label']}' reads {w} {c[w]}, which the "
                                f"row does not run ({w}s: {', '.join(ran)})")
                if w not in c and len(ran) != 1:
                    _fail(path, f"row {rid}: column '{c['label']}' reads one {w} but the row "
                                f"runs {', '.join(ran)} (name one with {w}:)")
    g["rows"] = rows
    g["extra_set"] = dict(extra_set or {})
    if tag is not None and (not isinstance(tag, str) or not NAME_RE.match(tag)
                            or SEED_RE.match(tag)):
        raise UserError(f"--tag {tag!r}: letters, digits, '_' or '.', not s<number>")
    g["variant"] = (tag or "x" + hashlib.sha256(json.dumps(
        g["extra_set"], sort_keys=True).encode()).hexdigest()[:6]) if g["extra_set"] else None
    return g


def check_metric_column(path, c, targets):
    """A metric column names a key its stage records, and valid dataset/model/kernel values."""
    stage = c.get("stage") or ("train" if "model" in c else "svm" if "kernel" in c else None)
    if stage is None and len(set(targets) & set(STAGE_SECTIONS)) == 1:
        stage = next(t for t in targets if t in STAGE_SECTIONS)
    if stage not in STAGE_SECTIONS:
        _fail(path, f"column '{c['label']}': name its stage (stage: train or svm), as "
                    f"targets does not say it")
    c["stage"] = stage
    allowed = P.METRICS[stage] + P.DERIVED_METRICS[stage]
    if c["metric"] not in allowed:
        _fail(path, f"column '{c['label']}': unknown metric {str(c['metric'])[:100]!r} of stage "
                    f"{stage} (allowed: {', '.join(allowed)})")
    for w in ("dataset", "model", "kernel"):
        if w in c and w not in WHICH[stage]:
            _fail(path, f"column '{c['label']}': '{w}' does not apply to stage {stage}")
        options = {"dataset": P.DATASETS, "model": P.MODELS, "kernel": P.KERNELS}[w]
        if w in c and c[w] not in options:
            _fail(path, f"column '{c['label']}': {w} {str(c[w])[:100]!r} (allowed: "
                        f"{', '.join(options)})")


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
        keys |= {f"{sec}.{k}" for sec in STAGE_SECTIONS[st] for k in P.SCHEMA[sec]}
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


def _read_params(params_path):
    p = read_yaml(params_path)
    if not isinstance(p, dict):
        raise UserError(f"{params_path}: expected a mapping of sections "
                        f"({', '.join(P.SCHEMA)})")
    return p


def known(dotted=""):
    """What a parameter name may be: the keys of its section, or the sections."""
    sec = str(dotted).partition(".")[0]
    if sec in P.SCHEMA:
        return [f"{sec}.{k}" for k in P.SCHEMA[sec]]
    return [f"{s}.*" for s in P.SCHEMA]


def valid_fmt(spec):
    try:
        format(1.5, spec)
        return True
    except (ValueError, TypeError):
        return False


def apply(base, overrides, where):
    """base params with `section.key` overrides applied and validated; UserError names the row."""
    p = copy.deepcopy(base)
    for dotted, value in overrides.items():
        sec, _, key = str(dotted).partition(".")
        if sec not in P.SCHEMA or key not in P.SCHEMA[sec]:
            raise UserError(f"{where}: unknown parameter {bounded(repr(dotted), 60)} "
                            f"(known: {', '.join(known(dotted))})")
        if not isinstance(p.get(sec), dict):
            raise UserError(f"{where}: params.yaml has no section '{sec}' to override")
        p[sec][key] = value
    try:
        return P.validate(p, list(P.SCHEMA), source="params.yaml")
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
    for name, rec in run_failures().items():  # failed under `grid run`: DVC never saw them
        if out.get(name, {}).get("state") != "success":
            out[name] = rec
    return out


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
    queued = []
    for job in to_run(grid, seeds, exps, force):
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
    return queued


def error_line(text):
    """The one line that says why a run failed: the stage's own `error: ` line, else DVC's last
    `ERROR: ` line; bounded."""
    lines = text.splitlines()
    ours = [l.strip() for l in lines if l.startswith("error: ")]
    theirs = [l.strip() for l in lines if l.startswith("ERROR: ")]
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
                     help="GPUs per run (default: 1 where the cluster has GPUs, else 0)")
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
    if a.cpus_per_run < 1 or (a.gpus_per_run is not None and a.gpus_per_run < 0):
        raise UserError("--cpus-per-run: an integer >= 1; --gpus-per-run: a number >= 0")
    g = load(a.grid, _parse_set(a.set), tag=a.tag)
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
