"""One planned run in a fresh clone, wherever a scheduler put it (a Ray task, a Slurm array
task): clone the git remote at the driver's commit into a directory of its own (never two DVC
processes in one repository), `dvc exp run -n NAME -S ...`, `dvc exp push` (git refs to the git
remote, outputs to the DVC remote). A stage that fails is a FAILED run with its error line, kept
where the report finds it (record.dvc.RUN_FAILURES).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ablation.core.cli import UserError, bounded
from ablation.core.io import replace_atomic, write_json
from ablation.core.process import die_with_parent
from ablation.record.dvc import RUN_FAILURES, error_line

PACKING_ENV = ("ABLATION_PACKING", "ABLATION_GPU_SHARED_BY")  # stages/train.py records them


def git(*args, cwd=None):
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"git {' '.join(args[:2])} failed: {bounded(r.stderr.strip(), 200)}")
    return r.stdout.strip()


FORECAST_FILE = re.compile(r"reports/[^/]+\.forecast\.json")


def check_commit(remote):
    """The commit every task checks out: HEAD, committed, and on `remote` (unless the remote is
    this repository itself). The forecasts `grid queue` saves (reports/<grid>.forecast.json)
    may differ from HEAD's: no run reads them."""
    changed = [p for p in git("diff", "--no-relative", "-z", "--name-only", "HEAD").split("\0")
               if p and not FORECAST_FILE.fullmatch(p)]
    if changed:
        raise UserError(f"uncommitted changes ({bounded(changed[0], 100)}"
                        f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): "
                        "grid run runs a commit, so commit them first (git status shows them)")
    head = git("rev-parse", "HEAD")
    if os.path.realpath(remote) != os.path.realpath(os.getcwd()):
        tips = git("ls-remote", remote).split()
        if head not in tips:
            raise UserError(f"HEAD {head[:8]} is not pushed to {bounded(remote, 100)}: "
                            f"git push {bounded(remote, 100)} HEAD first")
    return head


def cpus_of(job, default):
    """The CPUs a run is given: its train.threads where a number (the numbers depend on it),
    else `default` (--cpus-per-run), which `auto` then resolves to (ABLATION_CPUS)."""
    threads = job.params["train"]["threads"]
    return threads if isinstance(threads, int) else default


def spec_of(job, commit, remote, dvc_remote, cpus, env, workdir=None):
    """What a run needs on any node: its name and `dvc exp run` arguments, the commit and the
    remotes, its CPUs, the environment to pass on, the folder its clone goes in (None: the
    system's temporary folder), and its planned epochs (for progress)."""
    epochs = job.params["train"]["epochs"] * len(job.params["data"]["datasets"]) * len(
        job.params["train"]["models"]) if job.runs_stage("train") else 0
    return {"name": job.name, "args": job.dvc_args(), "commit": commit, "remote": remote,
            "dvc_remote": dvc_remote, "cpus": cpus, "overwrite": job.overwrite, "env": env,
            "bin": os.path.dirname(sys.executable), "workdir": workdir, "epochs": epochs}


STAGE_RE = re.compile(r"Running stage '([^']+)'")
BAR_RE = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a progress bar's update: not kept in logs
EPOCH_RE = re.compile(r"^epoch (\d+)/(\d+): .* test ([\d.]+)% (\d+) img/s")


def epoch_event(line, stage):
    """{stage, epoch, epochs, accuracy, images_per_s} from a train stage's epoch line, or None."""
    m = EPOCH_RE.match(line)
    if not m:
        return None
    return {"stage": stage, "epoch": int(m[1]), "epochs": int(m[2]), "accuracy": float(m[3]),
            "images_per_s": int(m[4])}


def stream(cmd, cwd, env, on_event=None):
    """Run `cmd` in a process group of its own, its output merged; `on_event(event)` for each
    epoch line of a train stage. Any exception here (an interrupt, a cancel) stops the whole
    group with SIGTERM (the train stage keeps its finished epochs), then SIGKILL after 30 s.
    Returns (exit status, output)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, errors="replace",
                         start_new_session=True, preexec_fn=die_with_parent)
    out, stage = [], None
    try:
        for line in p.stdout:  # universal newlines: a progress bar's \r ends a line too
            if not BAR_RE.search(line):
                out.append(line)
            stage = (m[1] if (m := STAGE_RE.search(line)) else stage)
            if on_event and (ev := epoch_event(line, stage)):
                on_event(ev)
        return p.wait(), "".join(out)
    except BaseException:
        stop_group(p)
        raise


def stop_group(p):
    """SIGTERM to the process group of `p`, then SIGKILL to whatever of it is left after 30 s;
    returns once no process of the group runs (the train stage outlives `dvc exp run`, its
    parent, by the moment its own cleanup takes)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            p.poll()  # reap the leader: a zombie is not running, but it would count below
            if not group_running(p.pid):
                return
            time.sleep(0.1)


def group_running(pgid):
    """Whether a process of group `pgid` still runs (zombies aside: where PID 1 does not reap,
    an orphan's zombie stays)."""
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except FileNotFoundError:  # no /proc: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


COLLECT_BYTES = 1 << 20  # a collected file's most bytes (metrics JSON: a few hundred)


def run_in_clone(spec, where, extra_env=None, on_event=None, collect=()):
    """Run one spec in a fresh clone; returns what happened: {host ..., name, state, log,
    error, files}. `where`: the placement to report (host, node, gpus); `on_event`: see
    `stream`; `collect`: paths in the clone whose text a finished run returns in `files` (None
    where absent or too big). The clone is removed on every way out, an interrupt included."""
    if spec.get("workdir"):
        os.makedirs(spec["workdir"], exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{spec['name']}-", dir=spec.get("workdir"))
    inherited = {k: v for k, v in os.environ.items() if k not in PACKING_ENV}  # the spec says
    env = dict(inherited, OMP_NUM_THREADS=str(spec["cpus"]), ABLATION_CPUS=str(spec["cpus"]),
               **(extra_env or {}), PATH=spec["bin"] + os.pathsep + os.environ.get("PATH", ""),
               **spec["env"])

    def sh(*cmd):
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                              preexec_fn=die_with_parent)
    try:
        for cmd in (["git", "clone", "-q", "--no-checkout", spec["remote"], "."],
                    ["git", "checkout", "-q", spec["commit"]]):
            r = sh(*cmd)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])}: {r.stderr.strip()[-300:]}")
        if spec["dvc_remote"]:
            sh("dvc", "remote", "modify", "--local", "storage", "url", spec["dvc_remote"])
        rc, log = stream(["dvc", "exp", "run", "--pull", "-n", spec["name"], *spec["args"]],
                         work, env, on_event)
        if rc != 0:  # the stage's own error: a FAILED run, not retried
            return {**where, "name": spec["name"], "state": "failed", "log": log[-20000:],
                    "error": error_line(log)}
        for attempt in range(3):  # refs land in one repository: a lock race is retried
            p = sh("dvc", "exp", "push", *(["-f"] if spec["overwrite"] else []), spec["remote"],
                   spec["name"])
            if p.returncode == 0:
                break
            time.sleep(1 + attempt)
        else:
            raise RuntimeError(f"dvc exp push failed: {p.stderr.strip()[-300:]}")
        return {**where, "name": spec["name"], "state": "success", "log": log[-2000:],
                "files": {p: read_small(os.path.join(work, p)) for p in collect}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_small(path):
    try:
        with open(path, "rb") as f:
            data = f.read(COLLECT_BYTES + 1)
    except OSError:
        return None
    return data.decode(errors="replace") if len(data) <= COLLECT_BYTES else None


def record_failure(name, result):
    """Keep a failed run's log and error where `record.dvc.experiments` finds it for the report."""
    def write_log(tmp):
        with open(tmp, "w") as f:
            f.write(result.get("log") or "")
    replace_atomic(write_log, os.path.join(RUN_FAILURES, f"{name}.log"))
    write_json({k: result.get(k) for k in ("name", "error", "host", "node", "gpus")},
               os.path.join(RUN_FAILURES, f"{name}.json"))


def clear_failure(name):
    for ext in (".json", ".log"):
        try:
            os.remove(os.path.join(RUN_FAILURES, name + ext))
        except FileNotFoundError:
            pass
