"""What changed between two versions besides params, for a pull request's comparison: files
under src/ and the stages that depend on them (dvc.yaml's deps), dependency pins
(requirements.lock), dvc.lock's stage entries, grid files; the machines the two sides' runs
recorded (CPU and its instruction set, GPU, threads; the small-map kernel paths, which move
accuracy like a seed); and, for an experiment, the metrics files
it did not produce (its parent's, inherited).

Every file is read as text from git (or the workspace) and treated as possibly hostile: what
does not parse counts as absent, and every name that reaches the Markdown is bounded.
"""
import json
import re
import subprocess
from pathlib import Path

import yaml

from ablation.core.cli import bounded
from ablation.core.outputs import parse_metrics_path, record_path
from ablation.record.store import git_show
from ablation.report.format import printable

MAX_LISTED = 12  # files or stages named per line; the rest counted
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
MACHINE_KEYS = ("device_name", "cpu_isa", "threads")  # what a run's timing depends on


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True)


def read_at(commit, path):
    """A file's text at a commit (None: the workspace), or None where it is not there."""
    if commit is None:
        p = Path(path)
        return p.read_text(errors="replace") if p.is_file() else None
    return git_show(commit, path)


def load_yaml(text):
    try:
        doc = yaml.safe_load(text or "")
    except (yaml.YAMLError, ValueError, RecursionError):  # malformed, huge ints, deep nesting
        return {}
    return doc if isinstance(doc, dict) else {}


def changed_files(base, target):
    """Paths that differ between commit `base` and `target` (None: the workspace, its
    untracked files included), as git stores them (NUL-separated, unquoted); None where git
    cannot say (a shallow clone without `base`)."""
    raw = ["-c", "core.quotePath=false"]
    runs = [git(*raw, "diff", "-z", "--name-only", "--no-renames", base,
                *([target] if target else []), "--")]
    if target is None:
        runs.append(git(*raw, "ls-files", "-z", "--others", "--exclude-standard"))
    if any(r.returncode for r in runs):
        return None
    return sorted({p for r in runs for p in r.stdout.split("\0") if p})


def safe(text, limit=80):
    """A name from git or a file as it may sit in Markdown: bounded, no backtick, pipe or
    control character (a line break, a carriage return) to break out of its code span or
    table cell; put it in a code span, where Markdown and HTML are inert."""
    return printable(bounded(str(text), limit)).replace("`", "'").replace("|", "\\|")


def stages_in(dvc_yaml):
    """{stage name: its definition} of dvc.yaml's text (what is not a mapping left out)."""
    stages = load_yaml(dvc_yaml).get("stages")
    return {str(k): v for k, v in stages.items() if isinstance(v, dict)} \
        if isinstance(stages, dict) else {}


def stage_deps(dvc_yaml):
    """{dependency path: [stage names]} from dvc.yaml's text (interpolated paths left out)."""
    out = {}
    for name, st in stages_in(dvc_yaml).items():
        deps = st.get("deps")
        for d in deps if isinstance(deps, list) else []:
            if isinstance(d, str) and "${" not in d:
                out.setdefault(d.rstrip("/"), []).append(str(name))
    return out


def stages_of(path, deps):
    """The stages that depend on `path`: on it, or on a folder holding it."""
    return sorted({s for d, names in deps.items() if path == d or path.startswith(d + "/")
                   for s in names})


def pins(text):
    """{package: version} of a requirements lock's text."""
    out = {}
    for line in (text or "").splitlines():
        m = PIN.match(line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def lock_stages(text):
    """{stage entry: its lock data} of dvc.lock's text."""
    stages = load_yaml(text).get("stages")
    return stages if isinstance(stages, dict) else {}


def listed(items):
    """Names from files, each in a code span, the first MAX_LISTED of them."""
    items = [safe(i) for i in items]
    shown = ", ".join(f"`{i}`" for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def what_changed(base, target, params_changed):
    """The lines of the 'What changed' section: code (with its stages), pins, dvc.lock, grids,
    params, other files. `params_changed`: how many params differ."""
    files = changed_files(base, target)
    if files is None:
        return ["- **Files changed**: unknown (git cannot diff the two sides here: a shallow "
                "clone?)", f"- **Params**: {params_changed} changed" if params_changed else
                "- **Params**: none changed"]
    deps = stage_deps(read_at(target, "dvc.yaml") or read_at(base, "dvc.yaml"))
    code = [f for f in files if f.startswith("src/")]
    staged = [(f, stages_of(f, deps)) for f in code]
    out = []
    if code:
        hit = sorted({s for _, st in staged for s in st})
        each = [f"`{safe(f)}` ("
                + (f"stages: `{safe(', '.join(st), 200)}`" if st else "no stage") + ")"
                for f, st in staged]
        more = f"; and {len(each) - MAX_LISTED} more" if len(each) > MAX_LISTED else ""
        why = f"Stages whose code changed: `{safe(', '.join(hit), 200)}`: their results may " \
            "move with it." if hit else "No stage depends on it: the results cannot move with it."
        out.append(f"- **Code changed**: {'; '.join(each[:MAX_LISTED])}{more}. {why}")
    if "requirements.lock" in files or "pyproject.toml" in files:
        old, new = pins(read_at(base, "requirements.lock")), \
            pins(read_at(target, "requirements.lock"))
        moved = [f"{p} {old.get(p, '—')} → {new.get(p, '—')}"
                 for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
        out.append("- **Dependencies changed**: " + (listed(moved) if moved else
                   "pyproject.toml (no pin in requirements.lock moved)"))
    if "dvc.lock" in files:
        old, new = lock_stages(read_at(base, "dvc.lock")), lock_stages(read_at(target, "dvc.lock"))
        moved = [s for s in sorted(set(old) | set(new), key=str) if old.get(s) != new.get(s)]
        out.append(f"- **dvc.lock**: {len(moved)} stage run(s) recorded anew"
                   + (f": {listed(moved)}" if moved else ""))
    grids = [f for f in files if f.startswith("grids/")]
    if grids:
        out.append(f"- **Grid files changed**: {listed(grids)}")
    out.append(f"- **Params**: {params_changed} changed" if params_changed else
               "- **Params**: none changed")
    known = set(code) | set(grids) | {"requirements.lock", "pyproject.toml", "dvc.lock",
                                      "params.yaml"}
    other = [f for f in files if f not in known and not f.startswith("metrics/")]
    if other:
        out.append(f"- Other files: {listed(other)}")
    return out


def record(commit, metrics_file):
    """The run record (<metrics>.run.json) beside a metrics file, at a commit; {} if none."""
    try:
        doc = json.loads(read_at(commit, record_path(metrics_file)) or "{}")
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def machine(rec):
    """(device_name, cpu_isa, threads) of a run record, bounded; None where it names none."""
    m = tuple(safe(rec[k], 60) if rec.get(k) is not None else None for k in MACHINE_KEYS)
    return m if m[0] is not None else None


def describe(m):
    name, isa, threads, *paths = m
    text = f"{name}, {isa or 'ISA not recorded'}, {threads or '?'} threads"
    if paths and paths[0] is not None:
        text += f", {len(paths[0])} layers on the small-map matmul path"
    return text


MAX_PATHS = 400  # layers of a run's small_map_paths read (ResNet-50 has 53 convolutions)


def kernel_paths(rec):
    """The layers a run's record puts on the small-map matmul path (`small_map_paths`: chosen
    by timing where `train.small_maps` is auto), sorted and bounded; None where the record
    names none (small maps off, a GPU, an older record)."""
    p = rec.get("small_map_paths") if isinstance(rec, dict) else None
    layers = p.get("matmul") if isinstance(p, dict) else None
    if not isinstance(layers, list):
        return None
    return tuple(sorted({safe(x, 60) for x in layers[:MAX_PATHS] if isinstance(x, str)}))


def setting(rec):
    """What a run's numbers depend on besides its params and seed: machine(rec) and its
    kernel paths (kernel_paths); None where it names no machine. Two settings differ as
    machines do (differ: what one side leaves unrecorded is no difference)."""
    m = machine(rec)
    return None if m is None else m + (kernel_paths(rec),)


def paths_apart(settings):
    """The layers that some but not all of `settings` put on the matmul path, sorted."""
    at = len(MACHINE_KEYS)  # setting(): the machine's keys, then the paths
    known = [set(s[at]) for s in settings if len(s) > at and s[at] is not None]
    if len(known) < 2:
        return []
    return sorted(set.union(*known) - set.intersection(*known))


def differ(a, b):
    """Whether two machines differ in what is known of both (an ISA recorded on one side
    only is no difference)."""
    return a is not None and b is not None and any(
        x != y for x, y in zip(a, b) if x is not None and y is not None)


def produced(commit, is_exp):
    """The metrics files an experiment's own dvc.lock lists as stage outputs (what its run
    produced or restored); None for a commit or where dvc.lock is unreadable (all count)."""
    if not is_exp:
        return None
    stages = lock_stages(read_at(commit, "dvc.lock"))
    outs = {o["path"] for st in stages.values() if isinstance(st, dict)
            and isinstance(st.get("outs"), list) for o in st["outs"]
            if isinstance(o, dict) and isinstance(o.get("path"), str)}
    return outs or None


def stage_params(dvc_yaml):
    """{stage: [param keys it reads]} from dvc.yaml's text."""
    out = {}
    for name, st in stages_in(dvc_yaml).items():
        ps = st.get("params")
        out[name] = [p for p in ps if isinstance(p, str)] if isinstance(ps, list) else []
    return out


def recorded_runs(revisions):
    """[(Run, the stages its grid runs)] of the runs kept in reports/<grid>.json at each
    revision (None: the workspace), each once by name, the first revision's first: the record
    of seeds a change is judged against. A run keeps every metrics file of its commit; only
    those of the stages its grid targets (grids/<grid>.yaml) are its own (None: unknown, all
    count)."""
    from ablation.record.run import Run
    runs = {}
    for rev in revisions:
        if rev is None:
            paths = sorted(str(p) for p in Path("reports").glob("*.json"))
        else:
            paths = git("ls-tree", "--name-only", rev, "reports/").stdout.splitlines()
        for path in paths:
            if not path.endswith(".json") or path.endswith(".forecast.json"):
                continue
            try:
                doc = json.loads(read_at(rev, path) or "{}")
            except (ValueError, RecursionError):
                continue
            entries = doc.get("runs") if isinstance(doc, dict) else None
            grid = load_yaml(read_at(rev, f"grids/{Path(path).stem}.yaml"))
            targets = grid.get("targets") if isinstance(grid.get("targets"), list) else None
            for name, e in (entries.items() if isinstance(entries, dict) else ()):
                if name in runs:
                    continue
                try:
                    runs[name] = (Run.from_dict(str(name), e), targets)
                except (ValueError, TypeError, AttributeError):  # not the record's form
                    continue
    return list(runs.values())


def get(params, dotted):
    """params['section']['key'] of 'section.key'; None where either is missing."""
    sec, _, key = dotted.partition(".")
    section = params.get(sec) if isinstance(params, dict) else None
    return section.get(key) if isinstance(section, dict) else None


def seeds_of(runs, path, key, params, keys, same_machine=None, timing=False):
    """`key` of metrics file `path` in each finished recorded run (recorded_runs) that ran the
    configuration `params` names, seeds aside: equal on every key of `keys` (the stage's
    params, its seed left out) that both name; one value per seed and machine (a seed
    recorded twice, by two grids or DVC's run cache, is one run). `same_machine`: where
    given, only runs whose record names that machine (timings). None where the configuration
    is unknown (no keys, or no params on the side). `timing`: runs whose record says other
    processes loaded their machine (record.run.busy) are left out."""
    from ablation.record.run import busy, is_number
    keys = [k for k in keys if not k.endswith(".seed")]
    if not keys or not params:
        return None
    unit = parse_metrics_path(path)
    seed_key = f"{unit[0]}.seed" if unit else None
    out = {}
    for run, targets in runs:
        v = run.metric(path, key)
        if not (run.finished and run.params and is_number(v)) or \
                (targets is not None and (unit is None or unit[0] not in targets)):
            continue
        where = machine(run.values(path))
        if same_machine is not None and (where is None or differ(where, same_machine)):
            continue
        if timing and busy(run.values(path)):
            continue
        if all(a is None or b is None or a == b for a, b in (
                (get(run.params, k), get(params, k)) for k in keys)):
            seed = get(run.params, seed_key) if seed_key else None
            out.setdefault(run.name if seed is None else repr((seed, where)), float(v))
    return list(out.values())
