"""`python -m ablation.grid sbatch GRID`: a grid's runs as one Slurm array job, one run per array
task, every run still a DVC experiment.

The driver (a login node, in the repository) plans the runs that are missing, as `queue` and
`run` do, writes the job folder `.dvc/tmp/sbatch/<grid>-<job>/` (`runs.json`: one spec per
task; `job.sh`: the `#SBATCH` script, kept so what ran can be read) and submits it with
`sbatch`. Each task clones the git remote at the driver's commit into a directory of its own on
its node, runs `dvc exp run -n NAME -S ...`, and `dvc exp push`es the experiment (git refs to
the git remote, outputs to the DVC remote); a failed task leaves its error line where the report
finds it. `--wait` follows the job until it leaves the queue, then pulls each experiment into
this repository; later, `dvc exp pull <git remote> <name>` does the same.
"""
import json
import os
import shlex
import socket
import subprocess
import sys
import time

from ablation.core.cli import UserError, bounded
from ablation.core.io import replace_atomic, write_json
from ablation.grid.clone import (
    check_commit,
    clear_failure,
    cpus_of,
    record_failure,
    run_in_clone,
    spec_of,
)
from ablation.grid.queue import known_runs, to_run
from ablation.record.dvc import dvc, experiments

JOBS = os.path.join(".dvc", "tmp", "sbatch")
POLL_S = 5


def script(name, n, cpus, gpus, folder, partition=None, time_limit=None):
    """The array job's `#SBATCH` script: task i runs spec i of runs.json."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=ablation-{name}", f"#SBATCH --array=0-{n - 1}",
             "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --output={folder}/%a.log"]
    lines += [f"#SBATCH --gres=gpu:{gpus}"] if gpus else []
    lines += [f"#SBATCH --partition={partition}"] if partition else []
    lines += [f"#SBATCH --time={time_limit}"] if time_limit else []
    runs = os.path.join(folder, "runs.json")
    return "\n".join(lines + ["set -euo pipefail", f"exec {shlex.quote(sys.executable)} -m "
                              f"ablation.grid.slurm {shlex.quote(runs)} "
                              '"$SLURM_ARRAY_TASK_ID"']) + "\n"


def sbatch(path):
    """Submit a job script; its job id. One UserError where Slurm refuses or is not there."""
    try:
        r = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: run this on a Slurm login node") from None
    if r.returncode != 0:
        raise UserError(f"sbatch refused the job: {bounded(r.stderr.strip(), 300)}")
    return r.stdout.strip().split(";")[0]


def in_queue(job_id):
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True,
                       text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


def main(grid, seeds=None, force=False, cpus_per_run=1, gpus_per_run=0, partition=None,
         time_limit=None, remote=None, dvc_remote=None, wait=False):
    """Submit the grid's missing runs as one array job; its job id (None: nothing to run)."""
    remote = remote or os.getcwd()
    commit = check_commit(remote)
    todo = to_run(grid, seeds, known_runs(grid), force)
    if not todo:
        print("nothing to run: every run of the grid already succeeded with its plan")
        return None
    env = {k: os.environ[k] for k in ("DATA_MIRROR",) if k in os.environ}
    # one array job, one --cpus-per-task: the most any run's train.threads asks
    cpus = max(cpus_of(j, cpus_per_run) for j in todo)
    specs = [{**spec_of(j, commit, remote, dvc_remote, cpus, env), "repo": os.getcwd()}
             for j in todo]
    folder = os.path.abspath(os.path.join(JOBS, f"{grid['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
                                                 ))
    write_json(specs, os.path.join(folder, "runs.json"))
    path = os.path.join(folder, "job.sh")
    text = script(grid["name"], len(specs), cpus, int(gpus_per_run or 0), folder,
                  partition, time_limit)
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    replace_atomic(write, path)
    job_id = sbatch(path)
    print(f"submitted array job {job_id}: {len(specs)} run(s) "
          f"({', '.join(s['name'] for s in specs)}); logs in {os.path.relpath(folder)}/"
          f"<task>.log; `squeue -j {job_id}` follows it")
    if wait:
        collect(job_id, specs, remote)
    return job_id


def collect(job_id, specs, remote):
    """Wait until the job leaves the queue, then say how each run ended and pull the finished
    ones into this repository (where the git remote is another one)."""
    while in_queue(job_id):
        time.sleep(POLL_S)
    here = os.path.realpath(remote) == os.path.realpath(os.getcwd())
    runs = experiments()
    for s in specs:
        run = runs.get(s["name"])
        if not here and not (run and run.finished):
            dvc(["exp", "pull", "-f", remote, s["name"]])
            run = experiments().get(s["name"])
        print(f"{s['name']}: {(run.state if run else 'unknown').upper()}")


def task(runs_path, index):
    """One array task: run spec `index` of runs.json in a fresh clone; keep a failure's log."""
    with open(runs_path) as f:
        spec = json.load(f)[int(index)]
    where = {"host": socket.gethostname(), "node": os.environ.get("SLURM_JOB_ID"),
             "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    res = run_in_clone(spec, where)
    print(f"{spec['name']}: {res['state']}" + (f": {res['error']}" if res.get("error") else ""))
    os.chdir(spec["repo"])  # the failure record lives in the repository that submitted the job
    if res["state"] == "success":
        clear_failure(spec["name"])
    else:
        record_failure(spec["name"], res)
    return 0 if res["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(task(*sys.argv[1:3]))
