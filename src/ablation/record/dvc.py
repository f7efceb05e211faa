"""The one reader of DVC's experiment table: `dvc exp show --json` into runs (record.run.Run).

`table` gives every commit with its experiments (what `report.show` prints); `experiments`
the newest run of each experiment name with its records attached (what grid, report and
compare read). Runs that failed under `grid run` on Ray never reach DVC: they are kept in
.dvc/tmp/grid-run and join the table here.

The subprocess, not `dvc.api.exp_show()`: the API tabulates every metrics file's keys into one
row of columns (each stage run's values are needed apart, by file), follows first parents only
(no `--all-commits`), and gives no queue log path for a failed run, whose error line the
report quotes.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

from ablation.core.cli import UserError, bounded
from ablation.core.outputs import record_path
from ablation.record.run import Run

RUN_FAILURES = os.path.join(".dvc", "tmp", "grid-run")  # `grid run`'s failed runs: log + json
MAX_RECORD_BYTES = 1 << 20  # a run record is under 1 KB; more is not one of ours


def _d(x):
    return x if isinstance(x, dict) else {}


def _l(x):
    return [v for v in x if isinstance(v, dict)] if isinstance(x, list) else []


def dvc_exe():
    """The dvc program: PATH's, else the venv's; one UserError where there is none."""
    exe = shutil.which("dvc") or os.path.join(os.path.dirname(sys.executable), "dvc")
    if not os.path.exists(exe):
        raise UserError("dvc not found: run `make test` or `make run` once to set up .venv")
    return exe


def dvc(args, **kw):
    """Run dvc with an argument list (never a shell), its output captured."""
    return subprocess.run([dvc_exe()] + list(args), capture_output=True, text=True, **kw)


def exp_show(all_commits=True):
    """`dvc exp show --json` as parsed JSON; one UserError where DVC fails or prints no JSON."""
    r = dvc(["exp", "show", "--json"] + (["--all-commits"] if all_commits else []))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"dvc exp show failed: {bounded(last, 200)}")
    try:
        return json.loads(r.stdout or "[]")  # DVC writes a NaN metric as NaN: json reads it
    except ValueError as e:
        raise UserError(f"dvc exp show --json printed no JSON ({bounded(str(e), 100)})") \
            from None


def _run(name, state, rev, data, log=None):
    """A Run from one revision's `data`; a run that did not succeed keeps its params and time
    but never its metrics (DVC shows the parent's). A commit (state 'commit') keeps its own."""
    data = _d(data)
    if state not in ("success", "commit"):
        data = {k: v for k, v in data.items() if k != "metrics"}
    return Run.from_dict(str(name), {"state": state, "rev": rev, "log": log,
                                     "timestamp": data.get("timestamp") or "", "data": data})


def table(doc):
    """[(commit, [its experiments])] of `dvc exp show --json` output, as Runs: a commit's
    state is 'commit' and its name the branch or tag (else the short rev); the workspace is
    left out. Every field is read as untrusted JSON."""
    out = []
    for commit in _l(doc):
        rev = str(commit.get("rev") or "")
        if rev == "workspace":
            continue
        label = f"{commit.get('name')} ({rev[:7]})" if commit.get("name") else rev[:7]
        exps = []
        for e in _l(commit.get("experiments")):
            ex = _d(e.get("executor"))
            for rv in _l(e.get("revs")):
                state = str(ex.get("state") or ("failed" if rv.get("error") else "success"))
                if rv.get("error") and state == "success":
                    state = "failed"
                name = rv.get("name") or e.get("name") or str(rv.get("rev") or "")[:7]
                exps.append(_run(name, state, rv.get("rev"), rv.get("data"),
                                 _d(ex.get("local")).get("log")))
        out.append((_run(label, "commit", rev, commit.get("data")), exps))
    return out


def newest(doc):
    """{name: Run}: the newest run of each experiment name in the table."""
    out = {}
    for _, exps in table(doc):
        for run in exps:
            if run.name not in out or out[run.name].timestamp < run.timestamp:
                out[run.name] = run
    return out


def experiments(cwd=None):
    """{name: Run} of every experiment DVC knows (newest per name), with each finished run's
    records attached, and the runs that failed under `grid run`."""
    out = attach_records(newest(exp_show()), cwd)
    for name, run in run_failures().items():  # failed under `grid run`: DVC never saw them
        if not (name in out and out[name].finished):
            out[name] = run
    return out


def attach_records(runs, cwd=None):
    """{name: Run} with each finished run's records (<metrics>.run.json at its commit:
    environment, resolved switches) merged into its metrics; keys a metrics file already has
    win. One `git cat-file --batch` for all; a missing, oversized or malformed record is left
    out."""
    wanted = [(r.name, p) for r in runs.values() if r.finished and r.rev for p in r.metrics]
    if not wanted:
        return dict(runs)
    records = _cat_files([f"{runs[n].rev}:{record_path(p)}" for n, p in wanted], cwd)
    merged = {}
    for (name, path), body in zip(wanted, records):
        try:
            rec = json.loads(body) if body is not None and len(body) <= MAX_RECORD_BYTES \
                else None
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            merged.setdefault(name, {})[path] = {**rec, **runs[name].metrics[path]}
    return {n: r if n not in merged else
            dataclasses.replace(r, metrics={**r.metrics, **merged[n]})
            for n, r in runs.items()}


def _cat_files(objects, cwd=None):
    """The bytes of each `rev:path` object (None where git has none); all None without git."""
    try:
        r = subprocess.run(["git", "cat-file", "--batch"], capture_output=True, cwd=cwd,
                           input="".join(f"{o}\n" for o in objects).encode())
    except OSError as e:  # no git: the records stay unread, the metrics still show
        print(f"warning: run records not read ({e.strerror})", file=sys.stderr)
        return [None] * len(objects)
    if r.returncode != 0:
        print(f"warning: run records not read: git cat-file: "
              f"{bounded(r.stderr.decode(errors='replace').strip(), 200)}", file=sys.stderr)
        return [None] * len(objects)
    out, pos, res = r.stdout, 0, []
    for _ in objects:
        end = out.find(b"\n", pos)
        if end < 0:
            break
        header = out[pos:end].split()
        pos = end + 1
        if len(header) != 3 or not header[2].isdigit():  # "<rev:path> missing"
            res.append(None)
            continue
        size = int(header[2])
        res.append(out[pos:pos + size])
        pos += size + 1
    return res + [None] * (len(objects) - len(res))


def run_failures():
    """{name: Run} of runs that failed under `grid run` (state 'failed', the log beside)."""
    out = {}
    if os.path.isdir(RUN_FAILURES):
        for fname in sorted(os.listdir(RUN_FAILURES)):
            if fname.endswith(".json"):
                name = fname[:-len(".json")]
                out[name] = Run(name, "failed", log=os.path.join(RUN_FAILURES, name + ".log"))
    return out


def error_line(text):
    """The one line that says why a run failed: the stage's own `error: ` line, else DVC's last
    `ERROR: ` line; bounded."""
    lines = text.splitlines()
    ours = [line.strip() for line in lines if line.startswith("error: ")]
    theirs = [line.strip() for line in lines if line.startswith("ERROR: ")]
    return (ours or theirs or ["no error line in the log"])[-1][:300]


def failure_reason(run):
    """The stage's own one-line error from a failed run's log, else DVC's last ERROR line."""
    try:
        with open(run.log or "", errors="replace") as f:
            return error_line(f.read(1 << 22))  # a bounded read: logs can be huge
    except OSError:
        return "log not available here"
