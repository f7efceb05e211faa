"""What `python -m ablation.grid` hands over to `python -m ablation.search` (same arguments):

    python -m ablation.grid search grids/search.yaml [--seeds N] [--parallel N] [--dry-run]
        [--set KEY=VALUE ...] [--tag NAME] [--address ADDR] [--cpus-per-run N]
        [--git-remote URL] [--dvc-remote URL]
    python -m ablation.grid queue|run GRID --until-settled [--max-seeds N] [--budget-h H] ...

search: the grid file's `search:` section (grid/space.py), run by search/driver.py; --seeds is
the confirmation's seeds (default search.seeds); --dry-run prints the space, the budget and the
forecast hours, and runs and writes nothing. --until-settled: search/settle.py, the rounds on
DVC's queue (queue) or Ray (run); --dry-run prints the first round.
"""
import random

from ablation.core.cli import UserError
from ablation.grid.command import parser
from ablation.grid.forecast import forecast, hours
from ablation.grid.queue import default_threads, known_runs
from ablation.grid.schema import load, select_rows
from ablation.grid.space import settings
from ablation.search import driver, rounds
from ablation.search.trials import job
from ablation.training.overrides import fmt_value, parse_set

SAMPLE = 40  # settings forecast where the space is infinite (ranges)


def sample(space, n, seed=0):
    """Settings to forecast: every one of a finite space, else `n` drawn at random."""
    every = settings(space)
    if every is not None:
        return every
    rng = random.Random(seed)

    def draw(d):
        if d[0] == "values":
            return rng.choice(d[1])
        lo, hi, log, integer = d[1:]
        x = lo * (hi / lo) ** rng.random() if log else lo + (hi - lo) * rng.random()
        return round(x) if integer else x
    return [{k: draw(d) for k, d in space.items()} for _ in range(n)]


def preview(grid, seeds):
    s = grid["search"]
    print(f"search {grid['name']}: {s['sampler']} sampler, {s['pruner']} pruner, "
          f"{s['direction']} {s['column']!r}; budget {s['trials']} trial(s)"
          + (f" or {s['hours']:g} h of training" if s["hours"] else ""))
    for k, d in s["space"].items():
        print(f"  {k}: " + (", ".join(fmt_value(v) for v in d[1]) if d[0] == "values" else
                            f"{d[1]:g} to {d[2]:g}{' (log)' if d[3] else ''}"))
    every = sample(s["space"], SAMPLE)
    jobs = [job(grid, x, 0, trial=True) for x in every]
    auto = default_threads()
    ests, speeds = forecast(grid, jobs, known_runs(grid), {j.name: auto if not isinstance(
        j.params["train"]["threads"], int) else j.params["train"]["threads"] for j in jobs})
    known = [e.hours for e in ests if e.hours is not None]
    if not known:
        print("forecast: no estimate (no record or calibration of these settings here)")
    else:
        mean = sum(known) / len(known)
        print(f"forecast on {speeds.machine}: at most {hours(mean * s['trials'])} h of trials "
              f"(none pruned), {hours(mean * s['top'] * (seeds or s['seeds']))} h to confirm "
              f"the best {s['top']} at {seeds or s['seeds']} seeds"
              + (f"; the full grid of {len(every)} settings: {hours(sum(known))} h"
                 if settings(s["space"]) is not None else ""))
    print("dry run: nothing run or written")


def check(a):
    if a.command == "search" and a.seeds is not None and a.seeds < 2:
        raise UserError(f"--seeds {a.seeds}: allowed: an integer >= 2 (a confirmation "
                        f"needs a spread)")
    if a.until_settled and a.command not in ("queue", "run"):
        raise UserError(f"--until-settled goes with queue or run, not {a.command}")
    if a.until_settled and (a.seeds is not None or a.force):
        raise UserError("--until-settled chooses the seeds itself: leave out --seeds and "
                        "--force (--max-seeds caps them)")
    if a.max_seeds < 2:
        raise UserError(f"--max-seeds {a.max_seeds}: allowed: an integer >= 2")
    if a.budget_h is not None and not a.budget_h > 0:
        raise UserError(f"--budget-h {a.budget_h:g}: allowed: a number of hours > 0")
    if a.parallel is not None and a.parallel < 1:
        raise UserError(f"--parallel {a.parallel}: allowed: an integer >= 1")
    if a.tag is not None and not a.set:
        raise UserError("--tag names the variant that --set makes: give --set too")


def main(argv):
    a = parser().parse_args(argv)
    check(a)
    g = load(a.grid, parse_set(a.set), tag=a.tag)
    if a.command == "search":
        driver.check_ready(g)
        if a.dry_run:
            preview(g, a.seeds)
            return
        driver.main(g, a.seeds, a.address, a.cpus_per_run, a.git_remote, a.dvc_remote,
                    a.parallel)
        return
    if not g["claims"]:
        raise UserError(f"{a.grid}: no claims: --until-settled adds seeds until the claims "
                        f"are decided (claims: in the grid file)")
    rounds.main(select_rows(g, a.rows, a.grid), a)
