"""`python -m ablation.report.show [--all-commits] [--all-runs] [--width N]`: the experiments
table that fits a terminal.

`dvc exp show` has a column for every param of params.yaml (29), every dependency of every
stage (13 source and data files) and every key of every metrics file (42): 89 columns, most
cut to "…". This view reads the same record (`dvc exp show --json`) and turns it around: one
line per run (a metrics file) of each experiment, with what matters in a review: test
accuracy, images/s and training time, and only the params the experiment changed against the
commit it ran from. An experiment lists the runs it changed (where DVC restored them all from
its run cache, unchanged: the runs its params name, with the state "restored"); a commit lists
all.
The full record stays in `dvc exp show` and `dvc metrics show <file>`.
"""
import json
import shutil

from ablation.core.cli import Parser, bounded, run
from ablation.core.outputs import LISTS, WHICH, parse_metrics_path
from ablation.record.dvc import exp_show
from ablation.record.dvc import table as exp_table
from ablation.report.format import MISSING, aligned, value
from ablation.training.overrides import fmt_value

# (header, metric key, formatter) per column after Experiment, State, Created and Run
METRICS = (("acc %", "test_accuracy", lambda v: f"{v:.2f}"),
           ("img/s", "images_per_s", lambda v: f"{v:,.0f}"),
           ("train", "train_time_ms", lambda v: duration(v / 1e3)))
HEAD = ("Experiment", "State", "Created", "Run") + tuple(h for h, _, _ in METRICS) + (
    "Params changed",)


def duration(s):
    if s < 100:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 6000 else f"{s / 3600:.1f} h"


def _d(x):
    """x if it is a mapping, else an empty one: the JSON is read, not trusted."""
    return x if isinstance(x, dict) else {}


def same(a, b):
    """Equal as JSON (NaN equals NaN: a diverged run's NaN loss is not a change)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def flat(d, prefix=""):
    """{"train.lr": 0.001, ...} from nested mappings."""
    out = {}
    for k, v in _d(d).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def cell(v, fmt):
    return value(v, fmt, 12)


def created(ts):
    """'2026-11-29T06:12:31' -> '11-29 06:12'."""
    ts = str(ts or "")
    return f"{ts[5:10]} {ts[11:16]}" if len(ts) >= 16 else MISSING


def run_label(path):
    """'metrics/resnet/mnist/resnet18.json' -> 'mnist resnet18'; 'metrics/svm/mnist/rbf.json'
    -> 'mnist svm rbf'; other paths as they are."""
    unit = parse_metrics_path(path)
    if unit is None:
        return path
    stage, dataset, name = unit
    return f"{dataset} {name}" if stage == "train" else f"{dataset} {stage} {name}"


def in_matrix(path, params):
    """Whether `path` is the metrics file of a stage run these params' matrices contain."""
    unit = parse_metrics_path(path)
    if unit is None:
        return False
    ran = {w: params.get(".".join(LISTS[w])) for w in WHICH[unit[0]]}
    return all(isinstance(v, list) and part in v for v, part in zip(ran.values(), unit[1:]))


def lines_for(run, state, base_params, base_metrics, all_runs):
    """Rows (tuples of strings) for one revision (a Run): its changed runs (all, for a
    commit)."""
    name, metrics, params = bounded(run.name, 40), run.metrics, flat(run.params)
    changed = " ".join(f"{k}={fmt_value(v)}" for k, v in sorted(params.items())
                       if not same(base_params.get(k), v)) if base_params is not None else ""
    ts = created(run.timestamp)
    if all_runs or base_metrics is None:
        runs = list(metrics)
    else:  # the runs it changed; none changed (DVC's run cache): the runs its params name
        runs = [p for p in metrics if not same(metrics[p], base_metrics.get(p))]
        if not runs:
            runs = [p for p in metrics if in_matrix(p, params)]
            state = "restored" if state == "success" and runs else state
    if not runs:
        return [(name, state, ts, MISSING if metrics or state != "success" else "(no metrics)")
                + ("",) * len(METRICS) + (changed,)]
    out = []
    for i, path in enumerate(runs):
        vals = tuple(cell(metrics[path].get(key), fmt) for _, key, fmt in METRICS)
        first = i == 0
        out.append((name if first else "", state if first else "", ts if first else "",
                    run_label(path)) + vals + (changed if first else "",))
    return out


def table(doc, all_runs=False):
    """Rows of `dvc exp show --json` output (record.dvc.table): each commit, then its
    experiments."""
    rows = []
    for commit, exps in exp_table(doc):
        rows += lines_for(commit, "commit", None, None, True)
        base_p, base_m = flat(commit.params), commit.metrics
        for e in exps:
            rows += lines_for(e, bounded(e.state, 10), base_p, base_m, all_runs)
    return rows


def render(rows, width):
    """Aligned text (report.format.aligned); the params column takes what the others leave."""
    return aligned(HEAD, rows, width, right={4, 5, 6})


def main(all_commits=False, all_runs=False, width=None):
    doc = exp_show(all_commits)
    width = width or shutil.get_terminal_size((120, 24)).columns
    text = render(table(doc, all_runs), width)
    print(text)
    return text


def _cli(argv):
    ap = Parser(prog="python -m ablation.report.show",
                description="The experiments as one line per run: accuracy, images/s, training "
                            "time and the params each experiment changed; fits a terminal.")
    ap.add_argument("--all-commits", action="store_true",
                    help="experiments of every commit, not only those of HEAD")
    ap.add_argument("--all-runs", action="store_true",
                    help="every run of each experiment, not only the runs it changed")
    ap.add_argument("--width", type=int,
                    help="characters per line (default: the terminal's, else 120)")
    a = ap.parse_args(argv)
    if a.width is not None and a.width < 60:
        ap.error("--width must be at least 60")
    main(a.all_commits, a.all_runs, a.width)


if __name__ == "__main__":
    run(_cli)
