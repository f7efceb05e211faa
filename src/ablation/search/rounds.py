"""The rounds of `--until-settled` (search/settle.py) on DVC's queue (`grid queue`) or on Ray
(`grid run`): the runs a round adds (seeds 0..n-1 of each row it names, what the record holds
skipped), running them, and the record's table after.

On the queue, a round queues its runs, starts `dvc queue start -j 1` and waits for them; Ctrl-C
stops the waiting, not the queue (its workers go on), and the same command picks up where the
record is. A round whose runs all fail ends the rounds (a failing run would be queued again
forever).
"""
import time

from ablation.core.cli import UserError
from ablation.grid import ray as cluster
from ablation.grid.forecast import forecast
from ablation.grid.queue import default_threads, known_runs, planned_threads, queue
from ablation.grid.schema import differences, plan, relevant_keys, select_rows
from ablation.record.dvc import dvc, experiments
from ablation.report.tables import tabulate
from ablation.search.settle import level_of, look, save, until_settled

POLL_S = 5  # between looks at the queue's experiments
ENDED = ("success", "failed")


def groups(want):
    """{seeds: [rows]} of a round's {row: seeds}."""
    out = {}
    for row, n in sorted(want.items()):
        out.setdefault(n, []).append(row)
    return out


def missing(grid, want, runs):
    """The Jobs of a round that the record does not hold as succeeded with their plan."""
    keys, out = relevant_keys(grid), []
    for n, rows in groups(want).items():
        for j in plan(select_rows(grid, rows, grid["path"]), n):
            r = runs.get(j.name)
            if r is None or r.state not in ("success", "queued", "running") or \
                    (r.state == "success" and differences(r.params, j.params, keys)):
                out.append(j)
    return out


def hours_of(grid):
    def h(want):
        runs = known_runs(grid)
        jobs = missing(grid, want, runs)
        auto = default_threads()
        ests, _ = forecast(grid, jobs, runs, {j.name: planned_threads(j, auto) for j in jobs})
        return sum(e.hours or 0.0 for e in ests)
    return h


def frame_of(grid):
    return lambda: tabulate(grid, known_runs(grid)).frame


def wait(names):
    """Until every experiment of `names` has ended (DVC's queue runs them)."""
    while True:
        runs = experiments()
        if all(n in runs and runs[n].state in ENDED for n in names):
            return sum(runs[n].state == "success" for n in names)
        time.sleep(POLL_S)


def queue_round(grid):
    def run_round(want):
        names = []
        for n, rows in groups(want).items():
            names += queue(select_rows(grid, rows, grid["path"]), n)
        if names:
            r = dvc(["queue", "start", "-j", "1"])
            if r.returncode != 0:
                raise UserError(f"dvc queue start failed: {r.stderr.strip()[-300:]}")
            if not wait(names):
                raise UserError(f"every run of the round failed ({', '.join(names)}): see "
                                f"dvc queue logs {names[0]}")
    return run_round


def ray_round(grid, a):
    def run_round(want):
        results = {}
        for n, rows in groups(want).items():
            results.update(cluster.main(select_rows(grid, rows, grid["path"]), n, False,
                                        a.address, a.gpus_per_run, a.cpus_per_run,
                                        a.git_remote, a.dvc_remote, quiet=a.quiet))
        if results and not any(r["state"] == "success" for r in results.values()):
            raise UserError(f"every run of the round failed ({', '.join(results)}): see "
                            f"python -m ablation.report {grid['path']}")
    return run_round


def main(grid, a):
    """`--until-settled` of `grid queue|run` (`a`: the parsed arguments)."""
    if a.dry_run:
        _, still, want = look(grid, frame_of(grid)(), level_of(a.max_seeds))
        want = {r: n for r, n in want.items() if n <= a.max_seeds}
        print(f"{len(still)} claim(s) open; the first round: " + (", ".join(
            f"{r} to {n} seeds" for r, n in sorted(want.items())) or "nothing to run"))
        if want:
            print(f"forecast: {hours_of(grid)(want):.2f} h")
        print("dry run: nothing queued, run or written")
        return
    run_round = queue_round(grid) if a.command == "queue" else ray_round(grid, a)
    results, why = until_settled(grid, frame_of(grid), run_round, a.max_seeds, a.budget_h,
                                 hours_of(grid))
    save(grid, a.max_seeds, results, why)
    for t in results:
        print(f"- {t.claim['claim']}: {t.verdict}")  # at the per-look level
    print(f"stopped: {why}; verdicts at level {level_of(a.max_seeds):.3g}, recorded in "
          f"reports/{grid['name']}.settle.json (python -m ablation.report {grid['path']})")
