"""`grid queue|run GRID --until-settled [--max-seeds N] [--budget-h H]`: seeds only where a
claim's verdict is still open.

In rounds: each round tests every claim of the grid file on the record (report.claims: matched
pairs, Welch or TOST, Holm over the claims), and every row of a claim still open gets one seed
more (two at first: a test needs a spread), queued on DVC or run on Ray, until every claim is
decided, its rows hold N seeds, or the next round's forecast would pass H hours.

Why the looks are corrected, and how. Testing after every round and stopping at the first
significant result inflates false positives: five looks at α = 0.05 each reject a true null
about 12-14 % of the time. The procedure fixes the most looks in advance, L = N − 1 (2, 3, ..., N
seeds a row), and tests each look at α / L (Bonferroni over the looks): whatever the dependence
between looks, P(any look rejects | no difference) <= L · α / L = α. A group-sequential
boundary (Pocock, O'Brien-Fleming) would spend α less conservatively, but it assumes normal
increments with known information fractions, which Welch tests on 2-10 seeds with their own
degrees of freedom are not; the price of Bonferroni is a few seeds more where an effect is
small. tests/test_search.py shows by simulation through `until_settled` that the rate stays
at most 5 % (and that the uncorrected looks exceed it). The level is recorded
(reports/<grid>.settle.json) and the report's verdicts use it.
"""
from ablation.core.io import write_json
from ablation.report.claims import col_index, tested, values
from ablation.report.search import settle_path

ALPHA = 0.05
FIRST = 2  # seeds a row at the first look: a test needs a spread
REPORTS = "reports"  # where reports/<grid>.settle.json goes (report.claims reads it)


def level_of(max_seeds):
    """The per-look level: α over the most looks, L = max_seeds − FIRST + 1."""
    return ALPHA / max(1, max_seeds - FIRST + 1)


def look(grid, frame, level):
    """(every claim tested, the open ones, {row: seeds it should hold next}) at `level`: a
    claim is decided where its Holm p is below `level`; refused (confounded) claims are never
    open (seeds cannot settle them)."""
    results = tested(grid, frame)
    still = [t for t in results if t.refused is None and
             not (t.p_holm is not None and t.p_holm < level)]
    want = {}
    for t in still:
        i = col_index(grid, t.claim["column"])
        for row in {r for pair in t.pairs for r in pair if r is not None}:
            n = len(values(frame, [row], i))
            want[row] = max(want.get(row, 0), FIRST if n < FIRST else n + 1)
    return results, still, want


def until_settled(grid, frame_of, run_round, max_seeds, budget_h=None, hours_of=None,
                  say=print, level=None):
    """The rounds (module docstring): `frame_of()` the record's frame now, `run_round(want)`
    runs the seeds that bring each row of `want` to its count, `hours_of(want)` forecasts it.
    Returns (every claim tested at the last look, its verdict at the per-look level; why it
    stopped). `level`: instead of the corrected one (only to show what uncorrected looks do)."""
    level = level or level_of(max_seeds)
    grid = dict(grid, claims_alpha=level)  # verdicts and planned seeds at the per-look level
    spent, rounds = 0.0, 0
    while True:
        results, still, want = look(grid, frame_of(), level)
        want = {r: n for r, n in want.items() if n <= max_seeds}
        say(f"look {rounds + 1}: {len(results) - len(still)} of {len(results)} claim(s) "
            f"decided at level {level:.3g} (α {ALPHA} over at most {max_seeds - FIRST + 1} "
            f"looks)")
        if not still:
            return results, "every claim decided"
        if not want:
            return results, f"{len(still)} claim(s) open with {max_seeds} seeds a row"
        h = hours_of(want) if hours_of else None
        if budget_h is not None and h is not None and spent + h > budget_h:
            return results, (f"the next round ({h:.2f} h) would pass the budget of "
                             f"{budget_h:g} h ({spent:.2f} h spent)")
        say("next round: " + ", ".join(f"{r} to {n} seeds" for r, n in sorted(want.items())))
        run_round(want)
        spent += h or 0.0
        rounds += 1


def save(grid, max_seeds, results, why, folder=REPORTS):
    """The sequential level the report's verdicts must use, and where the rounds ended."""
    write_json({"max_seeds": max_seeds, "looks": max_seeds - FIRST + 1,
                "level": level_of(max_seeds), "stopped": why,
                "claims": [{"claim": t.claim["claim"], "verdict": t.verdict}  # at the level
                           for t in results]}, settle_path(grid, folder))
