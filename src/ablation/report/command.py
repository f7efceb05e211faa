"""`python -m ablation.report GRID [--out reports]`: the study's table for one grid, its
figures, and the record it was built from.

    python -m ablation.report grids/table3.yaml [--out reports] [--plan-only]
                              [--with-variants NAME ...]
    python -m ablation.report --add gpu_study.tar.gz     # take in the GPU study's archive

Reads the runs the committed record holds (reports/<grid>.json) and the grid's live DVC
experiments (live runs win, where there are any); writes reports/<grid>.md, the PNG figures,
and the record again, each train run's per-epoch curves kept in it, so the same report can be
rebuilt on a clone that has none of the experiments. The report opens with the answer (page()):

    # title, the headline table (a line for each line of the table: the params that differ,
      ours, the study's figure and the verdict in the grid's first column with study figures)
    the grid's note (folded), the Conclusions (report.claims)
    the full table (folded), how to run the rows that need a GPU, the failures
    the forecast against actual, where `grid queue` saved one (reports/<grid>.forecast.json)
    the figures, then ## Method: the legends
"""
import os

from ablation.core.cli import Parser, UserError, bounded
from ablation.core.io import check_outputs, replace_atomic
from ablation.grid.schema import load, variants_of
from ablation.record import store
from ablation.record.dvc import experiments
from ablation.record.run import valid_variant
from ablation.report import claims, forecast, search
from ablation.report.headline import headline, notes
from ablation.report.tables import full, method, tabulate

REPORTS = "reports"  # the committed reports and their records


def check_variants(keep):
    for v in keep:
        if not valid_variant(v):
            raise UserError(f"--with-variants {bounded(repr(v), 60)}: not a variant name "
                            "(letters, digits, _ and ., as given to `grid queue --tag`)")


def combine(recorded, live):
    """The record's runs with the live experiments over them: a live run wins, except an
    unfinished DVC run over a run the record took in from a GPU archive."""
    return {**recorded, **{n: r for n, r in live.items()
                           if n not in recorded or r.finished or not recorded[n].imported}}


def select(g, runs, plan_only, keep):
    """The runs to report: every run of the grid, or (plan_only or keep) the rows as planned
    plus the variants named in `keep` (controlled runs worth a line)."""
    if keep:
        known = set().union(*(variants_of(g, name) for name in runs)) - {None}
        missing = [v for v in keep if v not in known]
        if missing:
            raise UserError(f"--with-variants {bounded(repr(missing[0]), 60)}: no run of the "
                            f"grid has that variant (variants with runs: "
                            f"{bounded(', '.join(sorted(known)) or 'none', 200)})")
    if not (plan_only or keep):
        return runs
    allowed = {None, *keep}
    return {n: r for n, r in runs.items() if variants_of(g, n) & allowed}


def kept(g, runs):
    """What the record keeps: the grid's finished runs, each with its curves."""
    return {n: store.with_curves(r) for n, r in runs.items()
            if r.finished and variants_of(g, n)}


def read_record(records, name):
    """The runs of the record at `records`; where --out names a folder that has none yet, the
    committed record reports/<grid>.json (a report elsewhere still starts from what ran)."""
    committed = os.path.join(REPORTS, f"{name}.json")
    if not os.path.exists(records) and os.path.exists(committed):
        print(f"no {records} yet: starting from the committed record {committed}")
        return store.load(committed)
    return store.load(records)


def page(g, t, fc="", pngs=(), runs=None, search_pngs=()):
    """The report's Markdown (module docstring) from its Table `t` (report.tables), the
    forecast's section `fc`, the figures' file names and (a search's section) the runs."""
    figs = "\n" + "\n".join(f"![{p}]({p})" for p in pngs) + "\n" if pngs else ""
    return (headline(t, claims.row_verdicts(g, t.frame)) + notes(g) + claims.section(g, t.frame)
            + search.section(g, runs, search_pngs) + full(t) + fc + figs
            + method(claims.method(g, t.frame)))


def main(grid_path, outdir=REPORTS, runs=None, plan_only=False, keep=(), imported=None):
    """Write the grid's report from its record and live experiments (`runs`: {name: Run}
    instead of DVC's); `imported`: the record to use instead of the file's (report --add has
    merged an archive into it)."""
    check_variants(keep)
    g = load(grid_path)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UserError(f"--out {bounded(outdir)}: not a directory")
    path, records = (os.path.join(outdir, f"{g['name']}{ext}") for ext in (".md", ".json"))
    check_outputs(path, records)
    recorded = read_record(records, g["name"]) if imported is None else imported
    g["claims_alpha"] = search.settled_level(g, outdir) or search.settled_level(g, REPORTS)
    fc = forecast.read(outdir, g["name"], REPORTS)  # reports/<grid>.forecast.json: grid queue's
    chosen = select(g, combine(recorded, experiments() if runs is None else runs),
                    plan_only, keep)
    record = kept(g, chosen)
    t = tabulate(g, {**chosen, **record})
    os.makedirs(outdir, exist_ok=True)
    from ablation.report.figures import figures  # matplotlib: only where figures are drawn
    pngs = figures(g, t.frame, outdir)
    both = {**chosen, **record}
    md = page(g, t, forecast.section(fc, both), pngs, both, search.figures(g, both, outdir))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(md)
    replace_atomic(write, path)
    store.save(records, g["name"], record)
    print(f"wrote {path} ({len(g['rows'])} rows, {len(pngs)} figures) and {records} "
          f"({len(record)} finished runs, {len(recorded)} of them read from it)")
    return path


def add(archive, outdir=REPORTS, grid_path=None, allow_dry_run=False):
    """Merge the archive's runs into each grid's record and rebuild that grid's report; with
    `grid_path`, only that grid's runs. Everything is read and checked (the archive, the
    records, DVC's experiments) before anything is written."""
    from ablation.gpu.intake import merge, read_runs
    incoming = read_runs(archive, allow_dry_run=allow_dry_run)
    if grid_path:
        name = load(grid_path)["name"]
        incoming = {k: v for k, v in incoming.items() if k == name}
    plans = []
    for name, (g, runs) in sorted(incoming.items()):
        path = g["path"] if not grid_path else grid_path
        merged, added, skipped = merge(store.load(os.path.join(outdir, f"{name}.json")), runs)
        for why in skipped:
            print(f"{path}: kept what the record holds for {why}")
        plans.append((path, merged, added))
    live = experiments() if any(added for _, _, added in plans) else {}
    for path, merged, added in plans:
        if not added:
            print(f"{path}: nothing new in {bounded(archive, 100)} (its runs are in the record)")
            continue
        print(f"{path}: adding {', '.join(added)}")
        main(path, outdir, runs=live, imported=merged)


def cli(argv):
    ap = Parser(prog="python -m ablation.report",
                description="Write reports/<grid>.md and figures from the grid's recorded and "
                            "live runs.")
    ap.add_argument("grid", nargs="?", help="a grid file, e.g. grids/table3.yaml")
    ap.add_argument("--add", metavar="ARCHIVE",
                    help="take the GPU study's archive (bench/gpu_study.sh) into the record of "
                         "its grids and rebuild their reports")
    ap.add_argument("--out", default=REPORTS,
                    help="directory for the report and figures (default: %(default)s; another "
                         "starts from the committed record reports/<grid>.json)")
    ap.add_argument("--plan-only", action="store_true",
                    help="leave out --set variants (smoke runs): the rows as planned only")
    ap.add_argument("--with-variants", nargs="+", default=[], metavar="VARIANT",
                    help="the rows as planned plus these --set variants, each on its own line "
                         "(e.g. a controlled run: `grid queue ... --set train.momentum=0.0 "
                         "--tag nomomentum`)")
    ap.add_argument("--allow-rehearsal", dest="allow_dry_run", action="store_true",
                    help="with --add: take a rehearsal's archive (toy CPU runs; a scratch clone)")
    a = ap.parse_args(argv)
    if a.add:
        return add(a.add, a.out, a.grid, a.allow_dry_run)
    if not a.grid:
        raise UserError("python -m ablation.report: give a grid file, or --add ARCHIVE")
    main(a.grid, a.out, plan_only=a.plan_only, keep=a.with_variants)

