"""A grid file's `search:` section: what `python -m ablation.grid search` looks for, and how.

    search:
      column: test acc %       # a metric column of the grid: what the search optimises
      direction: maximize      # maximize | minimize
      sampler: tpe             # tpe | random
      pruner: median           # median | hyperband | none: stop trials losing after an epoch
      trials: 8                # budget: trials that finish or are pruned
      hours: 2                 # optional budget: hours of the trials' recorded training
      top: 3                   # then confirm the best `top` settings ...
      seeds: 3                 # ... with this many new seeds each (1..seeds; trials run seed 0)
      margin: 0.5              # the confirmation's equivalence margin, in the column's units
      sampler_seed: 0          # the sampler's random seed (repetitions of a search differ here)
      space:                   # optional; without it: the grid's `factorial` values
        train.lr: {low: 0.0001, high: 0.1, scale: log}      # a range (scale: linear or log)
        train.batch_size: {values: [16, 64, 128]}           # or a list of values

A range of integers (both ends integers) samples integers. The space's params must be params
the grid's runs depend on; every setting of the space must run exactly one train stage unit
(one dataset, one model), whose `column` is the objective. Every key and value is checked
before anything runs: one line naming the file and key, exit status 2.

The space here is plain data: {param: ('values', [...]) or ('range', low, high, log, int)};
grid/search.py turns it into Optuna's distributions (no Optuna import here: a grid that does
not search never needs it).
"""
import itertools
import math

from ablation.core.cli import UserError, bounded
from ablation.training.overrides import apply, fmt_value, known
from ablation.training.params import check_fields, choice, short

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")


def number(lo=None, integer=False, null=False):
    def check(v):
        if v is None and null:
            return None
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or not math.isfinite(v) or (lo is not None and v < lo):
            return f"allowed: {'an integer' if integer else 'a number'}" + (
                f" >= {lo:g}" if lo is not None else "")
    return check


def positive(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        return "allowed: a number > 0"


SEARCH_SCHEMA = {
    "column": None,  # filled per grid: its metric columns
    "direction": choice(DIRECTIONS), "sampler": choice(SAMPLERS), "pruner": choice(PRUNERS),
    "trials": number(lo=1, integer=True), "hours": positive, "top": number(lo=2, integer=True),
    "seeds": number(lo=2, integer=True), "margin": positive,
    "sampler_seed": number(lo=0, integer=True),
    "space": lambda v: None if isinstance(v, dict) else "allowed: a mapping of param -> "
    "{values: [...]} or {low: L, high: H, scale: linear or log}",
}
DEFAULTS = {"direction": "maximize", "sampler": "tpe", "pruner": "median", "hours": None,
            "top": 3, "seeds": 3, "space": None, "sampler_seed": 0}


def check_search(path, g):
    """The grid's `search:` checked, with defaults and its space resolved ({param: dim}); None
    where the grid has none."""
    s = g.get("search")
    if s is None:
        return None
    labels = tuple(c["label"] for c in g["columns"] + g["extra"] if "metric" in c)
    if not labels:
        raise UserError(f"{path}: search.column: the grid has no metric column to optimise "
                        f"(add one under columns, e.g. {{label: test acc %, metric: "
                        f"test_accuracy}})")
    schema = dict(SEARCH_SCHEMA, column=choice(labels))
    s = check_fields(s, schema, path, "search.", required=("column", "trials", "margin"),
                     defaults=DEFAULTS)
    if s["top"] > s["trials"]:
        raise UserError(f"{path}: search.top = {s['top']}: allowed: at most search.trials "
                        f"({s['trials']})")
    space = dict((g.get("factorial") or {}).items())
    space = {k: ("values", list(v)) for k, v in space.items()}
    for key, spec in (s["space"] or {}).items():
        space[key] = dimension(path, key, spec)
    if not space:
        raise UserError(f"{path}: search.space: empty (allowed: a mapping of param -> "
                        f"{{values: [...]}} or {{low, high, scale}}, or a factorial to search)")
    s["space"] = space
    return s


def dimension(path, key, spec):
    where = f"search.space.{bounded(str(key), 60)}"
    if str(key) not in known(key):
        raise UserError(f"{path}: {where}: unknown parameter (known: {', '.join(known(key))})")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: {where} = {short(spec)}: allowed: {{values: [...]}} or "
                        f"{{low: L, high: H, scale: linear or log}}")
    if "values" in spec:
        if set(spec) != {"values"} or not isinstance(spec["values"], list) or not spec["values"]:
            raise UserError(f"{path}: {where} = {short(spec)}: allowed: {{values: a non-empty "
                            f"list}} alone")
        return ("values", list(spec["values"]))
    spec = check_fields(spec, {"low": number(), "high": number(),
                               "scale": choice(("linear", "log"))}, path, where + ".",
                        required=("low", "high"), defaults={"scale": "linear"})
    lo, hi, log = spec["low"], spec["high"], spec["scale"] == "log"
    if not lo < hi:
        raise UserError(f"{path}: {where}: low {lo:g} >= high {hi:g} (allowed: low < high)")
    if log and lo <= 0:
        raise UserError(f"{path}: {where}: a log scale needs low > 0 (got {lo:g})")
    return ("range", lo, hi, log, isinstance(lo, int) and isinstance(hi, int))


def check_space(path, g, base, extra_set, metric_file):
    """Each value (each end of a range) of the search space applied over the grid's `set`: valid
    params, and a run of exactly the one train stage unit whose column the search optimises
    (`metric_file`: grid.schema's, which imports this module)."""
    col = next(c for c in g["columns"] + g["extra"] if c["label"] == g["search"]["column"])
    if col["stage"] != "train" or (g["targets"] and g["targets"] != ["train"]):
        raise UserError(f"{path}: search: searches run the train stage alone (targets: "
                        f"[train]) and optimise one of its columns (search.column "
                        f"{bounded(repr(col['label']), 60)} is of stage {col['stage']})")
    for key, dim in g["search"]["space"].items():
        for v in dim[1] if dim[0] == "values" else dim[1:3]:
            where = f"{path}: search.space.{key} = {bounded(fmt_value(v), 60)}"
            p = apply(base, {**g["set"], key: v, **(extra_set or {})}, where)
            if metric_file(col, p) is None:
                raise UserError(f"{where}: a trial must run one dataset and one model (its "
                                f"column {bounded(repr(col['label']), 60)} reads one)")


def settings(space):
    """Every setting of a space of values alone, as {param: value} in a fixed order; None where
    a range makes it infinite."""
    if any(d[0] != "values" for d in space.values()):
        return None
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k][1] for k in keys))]
