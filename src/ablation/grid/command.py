"""`python -m ablation.grid queue|run|show GRID`: a grid file's rows as DVC experiments.

    python -m ablation.grid queue grids/table3.yaml [--seeds N] [--dry-run] [--force]
                                 [--set KEY=VALUE ...] [--tag NAME] [--rows ID ...]
    python -m ablation.grid run grids/table3.yaml [--address ADDR] [--gpus-per-run X] ...
    python -m ablation.grid sbatch grids/table3.yaml [--partition P] [--time T] [--wait] ...
    python -m ablation.grid show grids/table3.yaml        # each run and its overrides
    python -m ablation.grid search grids/search.yaml [--seeds N] [--dry-run] ...  # search/
    python -m ablation.grid queue grids/table3.yaml --until-settled [--max-seeds N] [--budget-h H]

--dry-run (queue, run, sbatch) runs and writes nothing: it lists what would run and what is
recorded and skipped, with the forecast cost in hours and where each figure came from
(grid/forecast.py); a plain `queue` prints the forecast too and saves it to
reports/<grid>.forecast.json for the report.

The grid file's format: grid/schema.py. queue: grid/queue.py; run (Ray): grid/ray.py; sbatch
(Slurm): grid/slurm.py.
"""
import os
import sys

from ablation.core.cli import Parser, UserError
from ablation.grid import ray as cluster
from ablation.grid import slurm
from ablation.grid.queue import preview, queue
from ablation.grid.schema import load, plan, select_rows
from ablation.training.overrides import parse_set


def parser():
    ap = Parser(prog="python -m ablation.grid",
                description="Queue a grid file's rows as DVC experiments (queue), or run them "
                            "as Ray tasks across GPUs and machines (run).")
    ap.add_argument("command", choices=["queue", "run", "sbatch", "show", "search"],
                    help="queue: add the runs to DVC's queue; run: run them on Ray; sbatch: "
                         "submit them as one Slurm array job; show: print each run's "
                         "overrides; search: search the grid file's `search:` space on Ray "
                         "(prune, then confirm the best at new seeds)")
    ap.add_argument("grid", help="a grid file, e.g. grids/table3.yaml")
    ap.add_argument("--seeds", type=int, help="run each row N times with seed 0..N-1")
    ap.add_argument("--rows", nargs="+", metavar="ID",
                    help="only these rows (ids as in the grid file; default: every row)")
    ap.add_argument("--dry-run", action="store_true",
                    help="queue, run, sbatch: list what would run and what is recorded and "
                         "skipped, with the forecast hours; run nothing, write nothing")
    ap.add_argument("--force", action="store_true",
                    help="re-run experiments that already succeeded with the same params")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override for every row (e.g. data.train_limit=500); makes a variant")
    ap.add_argument("--tag", help="the variant's name for --set runs (default: a hash of them)")
    more = ap.add_argument_group("fewer runs (search/: search, and queue or run with "
                                 "--until-settled)")
    more.add_argument("--until-settled", action="store_true",
                      help="queue, run: add seeds in rounds only to rows of claims still open, "
                           "until every claim is decided (looks corrected: search/settle.py)")
    more.add_argument("--max-seeds", type=int, default=10,
                      help="--until-settled: at most N seeds a row (default: %(default)s)")
    more.add_argument("--budget-h", type=float,
                      help="--until-settled: stop before a round that would pass H hours")
    more.add_argument("--parallel", type=int,
                      help="search: at most N trials at once (default: as many as the CPUs "
                           "hold)")
    ray = ap.add_argument_group("run (Ray)")
    ray.add_argument("--address", help="a running Ray cluster (ray start --head prints it); "
                                       "default: start a local one")
    ray.add_argument("--gpus-per-run", type=float,
                     help="GPUs per run (default: 1 where the cluster has GPUs, else 0); a "
                          "fraction packs runs on one GPU: 0.25 puts four on each")
    ray.add_argument("--cpus-per-run", type=int, default=1,
                     help="CPUs per run; also its thread count (default: %(default)s)")
    ray.add_argument("--git-remote", help="where tasks clone from and push experiments to "
                                          "(default: this repository, for one machine)")
    ray.add_argument("--dvc-remote", help="DVC remote URL for the tasks (default: the "
                                          "repository's default remote)")
    ray.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    slurm = ap.add_argument_group("sbatch (Slurm; also --cpus-per-run, --gpus-per-run as whole "
                                  "GPUs, --git-remote, --dvc-remote)")
    slurm.add_argument("--partition", help="the Slurm partition (default: the cluster's)")
    slurm.add_argument("--time", help="each task's time limit, e.g. 02:00:00")
    slurm.add_argument("--wait", action="store_true",
                       help="follow the job until it ends, then pull and list its runs")
    return ap


def main(argv):
    a = parser().parse_args(argv)
    if a.command == "search" or a.until_settled:  # above the report (verdicts): handed over
        os.execv(sys.executable, [sys.executable, "-m", "ablation.search", *argv])
    if a.seeds is not None and a.seeds < 1:
        raise UserError(f"--seeds {a.seeds}: allowed: an integer >= 1")
    if a.tag is not None and not a.set:
        raise UserError("--tag names the variant that --set makes: give --set too")
    if a.cpus_per_run < 1:
        raise UserError(f"--cpus-per-run {a.cpus_per_run}: allowed: an integer >= 1")
    x = a.gpus_per_run  # Ray: whole GPUs above 1; a fraction packs floor(1/x) runs on a GPU
    if x is not None and not (x == 0 or (x.is_integer() and x >= 1) or 0.0001 <= x <= 0.5):
        raise UserError(f"--gpus-per-run {x:g}: allowed: 0, a whole number (1, 2, ...), or a "
                        "fraction 0.0001 to 0.5 that runs share (0.5: 2 per GPU, 0.25: 4)")
    if a.command == "sbatch" and x is not None and not x.is_integer():
        raise UserError(f"--gpus-per-run {x:g}: sbatch takes whole GPUs per task (0, 1, 2, ...)")
    g = select_rows(load(a.grid, parse_set(a.set), tag=a.tag), a.rows, a.grid)
    if a.dry_run and a.command in ("run", "sbatch"):
        preview(g, a.seeds, a.force, threads=a.cpus_per_run, how="names")
        return
    if a.command == "sbatch":
        slurm.main(g, a.seeds, a.force, a.cpus_per_run, int(x or 0), a.partition, a.time,
                   a.git_remote, a.dvc_remote, a.wait)
        return
    if a.command == "show":
        for job in plan(g, a.seeds):
            print(job.name, " ".join(job.dvc_args()))
        return
    if a.command == "run":
        results = cluster.main(g, a.seeds, a.force, a.address, a.gpus_per_run, a.cpus_per_run,
                               a.git_remote, a.dvc_remote, quiet=a.quiet)
        failed = [n for n, r in results.items() if r["state"] != "success"]
        if results:
            print(f"{len(results) - len(failed)} run(s) succeeded, {len(failed)} failed"
                  + (f" ({', '.join(failed)}): see python -m ablation.report" if failed else ""))
        return
    queue(g, a.seeds, a.dry_run, a.force)
