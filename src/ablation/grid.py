"""Grids of experiments: parse a grid file, queue its rows as DVC experiments.

    python -m ablation.grid queue grids/table3.yaml [--seeds N] [--dry-run] [--set KEY=VALUE ...]
    python -m ablation.grid show grids/table3.yaml        # rows and their override lists

A grid file (YAML):
    name: table3                 # experiments are named <name>-<row id>[-s<seed>]
    title: ...                   # the report's heading
    targets: [train]             # DVC stages to run (optional; default: the whole pipeline)
    set: {data.datasets: [fashion_mnist]}      # overrides for every row
    columns:                     # the study's table, its columns in its order
      - {label: batch, param: train.batch_size}
      - {label: test acc %, metric: "resnet/{dataset}/{model}.test_accuracy"}
    extra: [...]                 # columns the study lacked (same format)
    rows:
      - {id: r01, set: {train.batch_size: 16}, study: {test acc %: 92.07}}
    factorial: {train.lr: [0.001, 0.0001]}   # or: one row per combination of these values
Every override is checked against params.yaml's schema before anything is queued.
"""
import argparse
import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import yaml

from . import params as P
from .cli import UserError, run

GRID_KEYS = {"name", "title", "targets", "set", "columns", "extra", "rows", "factorial", "note"}
ROW_KEYS = {"id", "set", "study"}
COLUMN_KEYS = {"label", "param", "metric", "fmt"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # DVC experiment names: no '-' inside ids


def _fail(path, msg):
    raise UserError(f"{path}: {msg}")


def load(path, extra_set=None, params_path=P.PARAMS_FILE):
    """Read and check a grid file; return it with `rows` expanded and each row's params."""
    try:
        with open(path) as f:
            g = yaml.safe_load(f)
    except FileNotFoundError:
        _fail(path, "grid file not found")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        _fail(path, f"YAML syntax error{where}: {getattr(e, 'problem', None) or e}")
    if not isinstance(g, dict):
        _fail(path, f"expected a mapping with keys {', '.join(sorted(GRID_KEYS))}")
    unknown = set(g) - GRID_KEYS
    if unknown:
        _fail(path, f"unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(GRID_KEYS))})")
    if not isinstance(g.get("name"), str) or not NAME_RE.match(g["name"]):
        _fail(path, "name: required, letters, digits, '_' or '.' (it prefixes experiment names)")
    g.setdefault("title", g["name"])
    g.setdefault("set", {})
    g.setdefault("columns", [])
    g.setdefault("extra", [])
    g.setdefault("targets", [])
    if not isinstance(g["targets"], list) or not all(isinstance(t, str) for t in g["targets"]):
        _fail(path, "targets: a list of DVC stage names")
    for key in ("columns", "extra"):
        if not isinstance(g[key], list):
            _fail(path, f"{key}: a list of {{label, param|metric}} mappings")
        for c in g[key]:
            if not isinstance(c, dict) or set(c) - COLUMN_KEYS or "label" not in c \
                    or (("param" in c) == ("metric" in c)):
                _fail(path, f"{key}: bad column {c!r}: needs 'label' and exactly one of "
                            f"'param' or 'metric'")
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
        r.setdefault("set", {})
        r.setdefault("study", {})
        if not isinstance(r["set"], dict) or not isinstance(r["study"], dict):
            _fail(path, f"row {rid}: 'set' and 'study' must be mappings")
        labels = {c["label"] for c in g["columns"]}
        for label in r["study"]:
            if label not in labels:
                _fail(path, f"row {rid}: study value for unknown column '{label}' "
                            f"(columns: {', '.join(sorted(labels))})")
        r["overrides"] = {**g["set"], **r["set"], **(extra_set or {})}
        r["params"] = apply(base, r["overrides"], f"{path}: row {rid}")
    g["rows"] = rows
    return g


def _read_params(params_path):
    with open(params_path) as f:
        return yaml.safe_load(f)


def apply(base, overrides, where):
    """base params with `section.key` overrides applied and validated; UserError names the row."""
    p = copy.deepcopy(base)
    for dotted, value in overrides.items():
        sec, _, key = str(dotted).partition(".")
        if sec not in P.SCHEMA or key not in P.SCHEMA[sec]:
            known = [f"{s}.{k}" for s in P.SCHEMA for k in P.SCHEMA[s]]
            raise UserError(f"{where}: unknown parameter '{dotted}' (known: {', '.join(known)})")
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


def exp_name(grid, row_id, seed=None):
    return f"{grid['name']}-{row_id}" + ("" if seed is None else f"-s{seed}")


def plan(grid, seeds=None):
    """[(experiment name, row, seed, dvc command as an argument list)] for every run."""
    out = []
    for r in grid["rows"]:
        for seed in (range(seeds) if seeds else [None]):
            over = dict(r["overrides"])
            if seed is not None:
                over["train.seed"] = seed
                over["svm.seed"] = seed
            name = exp_name(grid, r["id"], seed)
            cmd = ["dvc", "exp", "run", "--queue", "-n", name]
            for k, v in over.items():
                cmd += ["-S", f"{k}={fmt_value(v)}"]
            out.append((name, r, seed, cmd + list(grid["targets"])))
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
    return parse_exp_show(json.loads(r.stdout or "[]"))


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


def queue(grid, seeds=None, dry_run=False):
    """Queue every run of `grid` not already succeeded, queued or running. Returns names queued."""
    known = {} if dry_run else experiments()
    queued = []
    for name, _, _, cmd in plan(grid, seeds):
        state = known.get(name, {}).get("state")
        if state in ("success", "queued", "running"):
            print(f"skip {name}: already {state}")
            continue
        print(" ".join(cmd))
        if not dry_run:
            r = dvc(cmd[1:])
            if r.returncode != 0:
                raise UserError(f"queueing {name} failed: {r.stderr.strip()}")
        queued.append(name)
    if not dry_run:
        print(f"queued {len(queued)} experiment(s); start them with `dvc queue start -j 1`")
    return queued


def _parse_set(items):
    out = {}
    for s in items or []:
        k, eq, v = s.partition("=")
        if not eq:
            raise UserError(f"--set {s!r}: expected KEY=VALUE, e.g. train.epochs=1")
        out[k] = yaml.safe_load(v)
    return out


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m ablation.grid")
    ap.add_argument("command", choices=["queue", "show"])
    ap.add_argument("grid")
    ap.add_argument("--seeds", type=int, help="run each row N times with seed 0..N-1")
    ap.add_argument("--dry-run", action="store_true", help="print the dvc commands only")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override for every row (e.g. data.train_limit=500)")
    a = ap.parse_args(argv)
    if a.seeds is not None and a.seeds < 1:
        raise UserError(f"--seeds {a.seeds}: allowed: an integer >= 1")
    g = load(a.grid, _parse_set(a.set))
    if a.command == "show":
        for name, _, _, cmd in plan(g, a.seeds):
            print(name, " ".join(cmd[6:]))
        return
    queue(g, a.seeds, a.dry_run)


if __name__ == "__main__":
    run(main)
