"""Queue a grid's runs on DVC (`dvc exp run --queue`), skipping what already ran as planned.

Every command's --dry-run is `preview`: it reads the recorded experiments as a real run would,
lists what would run and what is skipped, forecasts the cost (grid/forecast.py), and runs and
writes nothing.

Identity: a run is its RunId's name (record.run); `queue` skips a run that succeeded with the
params it plans now, and re-queues (overwrites) one whose plan changed. What succeeded is what
DVC's experiments here say and what the committed record (reports/<grid>.json) holds: a run
finished on another machine and committed is not run again on a fresh clone.
"""
import dataclasses
import os
import signal
import subprocess

from ablation.core.cli import UserError, bounded
from ablation.core.cores import machine_cores
from ablation.core.deferred import deferred_interrupts
from ablation.grid.forecast import forecast, report, save
from ablation.grid.schema import differences, plan, relevant_keys
from ablation.record import store
from ablation.record.dvc import dvc_exe, experiments
from ablation.training.overrides import fmt_value, get

REPORTS = "reports"  # where the committed records lie (report.command writes them)


def known_runs(grid):
    """{name: Run} of what a command knows of `grid`'s runs: the committed record's finished
    runs (reports/<grid>.json) under the DVC experiments here (a live run wins)."""
    return {**store.load(os.path.join(REPORTS, f"{grid['name']}.json")), **experiments()}


def to_run(grid, seeds, runs, force=False):
    """The Jobs of `grid` to start (`overwrite` set where a finished experiment of the name is
    replaced): not those queued or running, nor those that succeeded with the params planned
    now (unless `force`). `runs`: {name: Run} as record.dvc.experiments gives them. Prints why
    each run is skipped or re-run."""
    out, keys = [], relevant_keys(grid)
    for job in plan(grid, seeds):
        run = runs.get(job.name)
        state = run.state if run else None
        if state in ("queued", "running"):
            print(f"skip {job.name}: already {state}")
            continue
        if state == "success":
            diff = differences(run.params, job.params, keys)
            if not diff and not force:
                print(f"skip {job.name}: already success")
                continue
            why = "--force" if not diff else "plan changed since it ran: " + ", ".join(
                f"{k} {fmt_value(v)} -> {fmt_value(get(job.params, k))}"
                for k, v in diff.items())
            print(f"re-run {job.name} ({why})")
            job = dataclasses.replace(job, overwrite=True)
        out.append(job)
    return out


def default_threads():
    """The thread count a run of `grid` queued here computes with, where train.threads is
    `auto` (or absent): every core this process may run on."""
    return len(machine_cores())


def planned_threads(job, auto):
    """train.threads of a job as a number; `auto` (or absent: before the key existed) is
    `auto`, what the command gives each run."""
    t = job.params["train"].get("threads", "auto")
    return t if isinstance(t, int) and not isinstance(t, bool) else auto


def preview(grid, seeds=None, force=False, threads=None, how="dvc"):
    """A dry run of any command: what would run and what is recorded and skipped, with the
    forecast; runs nothing and writes nothing. `how`: print the dvc commands (queue) or the
    names (run, sbatch). Returns the names that would run."""
    runs = known_runs(grid)
    jobs = to_run(grid, seeds, runs, force)
    for job in jobs:
        print(" ".join(job.queue_cmd()) if how == "dvc" else f"would run {job.name}")
    show_forecast(grid, seeds, jobs, runs, threads)
    print("dry run: nothing queued, run or written")
    return [job.name for job in jobs]


def show_forecast(grid, seeds, jobs, runs, threads=None):
    """Print the forecast of `jobs` (the runs of `grid` not among them: skipped); returns
    (Estimates, Speeds)."""
    names = {job.name for job in jobs}
    skipped = [job.name for job in plan(grid, seeds) if job.name not in names]
    auto = threads or default_threads()
    ests, speeds = forecast(grid, jobs, runs, {j.name: planned_threads(j, auto) for j in jobs})
    report(ests, speeds, skipped)
    return ests, speeds


def queue(grid, seeds=None, dry_run=False, force=False):
    """Queue every run of `grid` that has not succeeded with the params planned now and is not
    queued or running; `force` re-runs finished ones too. Prints the forecast and saves it to
    reports/<grid>.forecast.json. `dry_run`: print only (preview). Returns the names queued."""
    if dry_run:
        return preview(grid, seeds, force)
    runs = known_runs(grid)
    queued, jobs = [], to_run(grid, seeds, runs, force)
    ests, speeds = show_forecast(grid, seeds, jobs, runs) if jobs else ([], None)
    saved = None
    try:
        for job in jobs:
            # `dvc exp run --queue` stashes params in the workspace: killed half-way (as
            # subprocess.run kills its child on an interrupt) it could leave params.yaml changed
            # or a stash entry behind. So it runs in a session of its own (a terminal's Ctrl-C
            # does not reach it), and an interrupt waits until it has ended and is counted.
            # The command is printed once the child has left the terminal's process group:
            # Popen returns after the child's setsid and exec, and a Ctrl-C before then can
            # kill the child before it ran anything (it is then neither shown nor counted).
            with deferred_interrupts():
                child = subprocess.Popen([dvc_exe(), *job.queue_args()], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True,
                                         start_new_session=True)
                print(" ".join(job.queue_cmd()), flush=True)
                _, err = child.communicate()
                if child.returncode == 0:
                    queued.append(job.name)
                elif child.returncode < 0:  # ended by a signal: say so, whatever comes next
                    err = f"dvc was ended by {signal.Signals(-child.returncode).name}"
                    print(f"  not queued: {err}", flush=True)
            if child.returncode != 0:
                raise UserError(f"queueing {job.name} failed: {bounded(err.strip(), 500)}")
    finally:  # what was queued keeps its forecast, also when a later one failed or was stopped
        if queued:
            saved = save(grid, [e for e in ests if e.name in queued], speeds)
    print(f"queued {len(queued)} experiment(s); start them with `dvc queue start -j 1`")
    if any(job.overwrite for job in jobs):
        print("note: an overwrite is `dvc exp run -f`, which runs every stage again, prepare "
              "included: offline, start the queue with DATA_MIRROR set")
    if saved:
        print(f"forecast saved to {saved}")
    return queued
