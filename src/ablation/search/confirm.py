"""The end of a search: its best `top` settings re-run at seeds 1..n as ordinary runs, and the
verdict on them from the record (report/search.py: the best against each other, Welch and TOST
with Holm).

Why new seeds: the search picked its best on seed 0, so seed 0's figure of the winner is biased
upward (the winner's curse); the confirmation's mean is not, and the verdict says how far it
fell from the search's best.
"""
from optuna.trial import TrialState

from ablation.grid.queue import known_runs
from ablation.search.trials import job


def best_settings(study, top, direction):
    """The `top` best distinct settings among the trials that completed, best first."""
    seen, out = set(), []
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and "repeat_of" not in t.user_attrs]
    for t in sorted(done, key=lambda t: t.value, reverse=direction == "maximize"):
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            out.append((dict(t.params), t.value))
    return out[:top]


def confirm(ray, search, n_seeds):
    """Run the confirmation of `search` (a driver.Search whose trials ended); returns the
    verdict lines."""
    from ablation.report.search import confirmation, verdict_lines
    grid = search.grid
    best = best_settings(search.study, grid["search"]["top"], grid["search"]["direction"])
    jobs = [job(grid, setting, seed, trial=False) for setting, _ in best
            for seed in range(1, n_seeds + 1)]
    todo = [j for j in jobs if search.recorded(j) is None]
    print(f"confirming the best {len(best)} setting(s) at seeds 1-{n_seeds}: {len(todo)} run(s)"
          f" to run, {len(jobs) - len(todo)} recorded", flush=True)
    for j in todo:
        search.start(None, j)
    while search.pending:
        search.answer()
        search.collect()
    lines = verdict_lines(confirmation(grid, known_runs(grid), search.study))
    print("\n".join(lines), flush=True)
    return lines
