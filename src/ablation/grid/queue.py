"""Queue a grid's runs on DVC (`dvc exp run --queue`), skipping what already ran as planned.

Identity: a run is its RunId's name (record.run); `queue` skips a run that succeeded with the
params it plans now, and re-queues (overwrites) one whose plan changed.
"""
import dataclasses

from ablation.core.cli import UserError
from ablation.grid.schema import differences, plan, relevant_keys
from ablation.record.dvc import dvc, experiments
from ablation.training.overrides import fmt_value, get


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


def queue(grid, seeds=None, dry_run=False, force=False):
    """Queue every run of `grid` that has not succeeded with the params planned now and is not
    queued or running; `force` re-runs finished ones too. Returns the names queued."""
    runs = {} if dry_run else experiments()
    queued, jobs = [], to_run(grid, seeds, runs, force)
    for job in jobs:
        print(" ".join(job.queue_cmd()))
        if not dry_run:
            r = dvc(job.queue_args())
            if r.returncode != 0:
                raise UserError(f"queueing {job.name} failed: {r.stderr.strip()[-500:]}")
        queued.append(job.name)
    if not dry_run:
        print(f"queued {len(queued)} experiment(s); start them with `dvc queue start -j 1`")
    if any(job.overwrite for job in jobs):
        print("note: an overwrite is `dvc exp run -f`, which runs every stage again, prepare "
              "included: offline, start the queue with DATA_MIRROR set")
    return queued
