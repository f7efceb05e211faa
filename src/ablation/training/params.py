"""Load params.yaml and validate the sections a stage reads, before any work starts.

Defaults live in params.yaml only; this module knows the allowed values, not the defaults.
Every key of a section must be present and known: a typo is an error that names the key.
"""
import math
import re
import reprlib

from ablation.core.cli import UserError, bounded, read_config
from ablation.training import datasets, models

PARAMS_FILE = "params.yaml"

# the allowed names come from the registries that implement them
DATASETS = tuple(datasets.DATASETS)
MODELS = tuple(models.MODELS)
OPTIMIZERS = tuple(models.OPTIMIZERS)
STEMS = tuple(models.STEMS)
KERNELS = tuple(models.KERNELS)
DEVICES = ("auto", "cpu", "cuda", "mps")
LOADERS = ("dataloader", "resident")
PRECISIONS = ("auto", "fp32", "bf16")
SVM_BACKENDS = ("auto", "libsvm", "gram")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune")
# auto | true | false switches of the train stage; auto is decided per device (engine.py)
SWITCHES = ("small_maps", "channels_last", "fused_optimizer", "malloc_tuning")
TRAIN_SIZE = max(d["sizes"]["train"] for d in datasets.DATASETS.values())  # training images
TEST_SIZE = max(d["sizes"]["test"] for d in datasets.DATASETS.values())  # test images
MAX_THREADS = 1024

# What each stage records. METRICS go to its metrics JSON (what `dvc exp show` and
# `dvc metrics diff` show): measurements. RECORD goes beside it, to <metrics>.run.json (io.py's
# record_path; `dvc metrics show <file>` shows it): where and how the run ran, the resolved
# switches. Grid columns may name either (grid.py checks against both).
METRICS = {
    "train": ("test_accuracy", "train_time_ms", "images_per_s", "data_wait_ms", "eval_time_ms",
              "gflops", "params_m", "peak_memory_mb", "epochs_completed", "diverged",
              "diverged_epoch", "pruned", "final_train_loss", "train_images", "test_images",
              "dropped_per_epoch"),
    "svm": ("test_accuracy", "train_time_ms", "predict_time_ms", "n_support"),
}
RECORD = {
    "train": ("loader", "pin_memory_effective", *SWITCHES, "small_map_paths", "precision",
              "compile_mode", "device", "device_name", "cpu_isa", "host", "cuda_visible_devices",
              "ray_node_id", "torch_version", "threads", "cores_wait_s", "other_load_cores",
              "timed_end", "packing", "gpu_shared_by", "cuda_version", "tf32_matmul", "tf32_cudnn",
              "cudnn_benchmark", "data_mean", "data_std"),
    "svm": ("train_samples", "test_images", "backend", "kernel", "gamma", "device", "device_name",
            "cpu_isa", "host", "threads"),
}
DERIVED_METRICS = {"train": ("data_wait_pct",), "svm": ()}  # computed by the report


_REPR = reprlib.Repr()  # values quoted in messages: bounded, however big or deep the input
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 60, 60, 40, 3
FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")  # 1e-3: YAML 1.1 text


def short(v):
    return _REPR.repr(v)


def to_number(v):
    """`1e-3` is a string to YAML 1.1 (it wants `1.0e-3`); users type it, so read it as 0.001."""
    return float(v) if isinstance(v, str) and FLOAT_RE.match(v) else v


# A checker takes a value and returns an error text ("allowed: ...") or None; one with a
# `coerce` attribute turns the value into what it checks first (validate keeps the result).
def choice(options):
    def check(v):
        if not isinstance(v, str) or v not in options:
            return f"allowed: one of {', '.join(options)}"
    return check


def integer(lo=None, hi=None, null=False):
    def check(v):
        if v is None and null:
            return None
        ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
            return "allowed: " + rng + (" or null" if null else "")
    return check


def auto_or_integer(lo, hi):
    """`auto` or an integer in [lo, hi] (what auto means is the caller's)."""
    num = integer(lo=lo, hi=hi)

    def check(v):
        if v != "auto" and num(v) is not None:
            return f"allowed: auto or an integer in [{lo}, {hi}]"
    return check


def number(lo=0.0, lo_open=True, hi=None):
    def check(v):
        try:
            f = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        except OverflowError:  # a 400-digit integer
            f = None
        if f is None or not math.isfinite(f) or (f <= lo if lo_open else f < lo) \
                or (hi is not None and f > hi):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            return f"allowed: a number {bound}" + (f" and <= {hi:g}" if hi is not None else "")
    check.coerce = to_number
    return check


def boolean(v):
    if not isinstance(v, bool):
        return "allowed: true or false"


def switch_value(v):
    """auto, true or false; YAML 1.1 reads on/off as booleans, YAML 1.2 (DVC's -S) as text."""
    return {"on": True, "off": False}.get(v, v) if isinstance(v, str) else v


def switch(v):
    v = switch_value(v)
    if v != "auto" and not isinstance(v, bool):
        return "allowed: auto, true or false"


def list_of(options):
    def check(v):
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v) \
                or any(x not in options for x in v) or len(set(v)) != len(v):
            return f"allowed: a non-empty list of distinct values from {', '.join(options)}"
    return check


def number_or(options, hi=None):
    num = number(hi=hi)

    def check(v):
        if isinstance(v, str) and v in options:
            return None
        if num(v) is not None:
            return f"allowed: {' or '.join(options)}, or a number > 0" + (
                f" and <= {hi:g}" if hi is not None else "")
    check.coerce = to_number
    return check


def text(pattern=None, what="a text"):
    def check(v):
        if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
            return f"allowed: {what}"
    return check


def mapping(v):
    if not isinstance(v, dict):
        return "allowed: a mapping"


def list_of_mappings(nonempty=False):
    def check(v):
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v) \
                or (nonempty and not v):
            return "allowed: a " + ("non-empty " if nonempty else "") + "list of mappings"
    return check


def check_fields(d, schema, source, where="", required=(), defaults=None):
    """Check the mapping `d` against {key: checker}: unknown keys, missing `required` keys, each
    value (coerced as its checker says). Returns a new dict: `defaults`, then `d`'s values (an
    empty value keeps its default). `where` prefixes key names in messages, e.g. 'train.' or
    'rows[r01].': "<source>: unknown key 'train.lr_max' (allowed keys: ...)",
    "<source>: train.lr = -1: allowed: a number > 0"."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: {where.rstrip('.') + ': ' if where else ''}expected a "
                        f"mapping with keys {', '.join(schema)}, got {type(d).__name__}")
    for key in d:
        if key not in schema:
            raise UserError(f"{source}: unknown key {bounded(repr(f'{where}{key}'), 80)} "
                            f"(allowed keys: {', '.join(schema)})")
    for key in required:
        if key not in d:
            raise UserError(f"{source}: missing key '{where}{key}'")
    out = dict(defaults or {})
    for key, v in d.items():
        if v is None and key in out:
            continue
        check = schema[key]
        v = getattr(check, "coerce", lambda x: x)(v)
        err = check(v)
        if err:
            raise UserError(f"{source}: {where}{key} = {short(d[key])}: {err}")
        out[key] = v
    return out


TRIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def trial_name(v):
    """train.trial: null, or the experiment name a search gave the run."""
    if v is not None and not (isinstance(v, str) and TRIAL_RE.match(v)):
        return "allowed: null, or a search trial's name (letters, digits, '_', '.', '-'; " \
            "at most 100)"


SEED_MAX = 2**32 - 1  # numpy and torch seeds; the per-epoch shuffle seed derives from it
SCHEMA = {
    "data": {
        "datasets": list_of(DATASETS),
        "train_limit": integer(lo=2, hi=TRAIN_SIZE, null=True),
        "test_limit": integer(lo=1, hi=TEST_SIZE, null=True),
    },
    "train": {
        "models": list_of(MODELS),
        "stem": choice(STEMS),
        "batch_size": integer(lo=2, hi=65536),  # BatchNorm needs 2 images
        "optimizer": choice(OPTIMIZERS),
        "momentum": number(lo=0.0, lo_open=False, hi=1.0),
        "lr": number(hi=1e6),
        "weight_decay": number(lo=0.0, lo_open=False, hi=10.0),
        "epochs": integer(lo=1, hi=10000),
        "pin_memory": boolean,
        "num_workers": integer(lo=0, hi=64),
        "threads": auto_or_integer(1, MAX_THREADS),
        "device": choice(DEVICES),
        "loader": choice(LOADERS),
        "precision": choice(PRECISIONS),
        "compile": boolean,
        "compile_mode": choice(COMPILE_MODES),
        **{k: switch for k in SWITCHES},
        "seed": integer(lo=0, hi=SEED_MAX),
        "trial": trial_name,
    },
    "svm": {
        "kernels": list_of(KERNELS),
        "train_samples": integer(lo=10, hi=TRAIN_SIZE),
        "C": number(hi=1e9),
        "gamma": number_or(("scale", "auto"), hi=1e9),
        "degree": integer(lo=1, hi=10),  # higher: minutes per fit, overflow
        "seed": integer(lo=0, hi=SEED_MAX),
        "backend": choice(SVM_BACKENDS),
    },
}


def validate(params, sections, source=PARAMS_FILE):
    """Check `sections` of a params dict (every key present and known); return {section:
    dict}. An entry "section.key" checks and returns that key alone (a stage that reads one key
    of a section depends on that key only). Raises UserError."""
    if not isinstance(params, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(sections)}), "
                        f"got {type(params).__name__}")
    out = {}
    for entry in sections:
        name, _, only = entry.partition(".")
        sec = params.get(name)
        if sec is None:
            raise UserError(f"{source}: missing section '{name}' "
                            f"(keys: {', '.join(SCHEMA[name])})")
        if not isinstance(sec, dict):
            raise UserError(f"{source}: section '{name}' must be a mapping "
                            f"(keys: {', '.join(SCHEMA[name])})")
        if only:
            schema = {only: SCHEMA[name][only]}
            part = check_fields({only: sec[only]} if only in sec else {}, schema, source,
                                f"{name}.", required=(only,))
            out[name] = {**out.get(name, {}), **part}
        else:
            out[name] = check_fields(sec, SCHEMA[name], source, f"{name}.",
                                     required=SCHEMA[name])
    return out


def load(sections, path=PARAMS_FILE):
    """Read and validate `sections` of the params file at `path` (see validate)."""
    params = read_config(path)
    if params is None:
        raise UserError(f"{path}: file is empty (expected sections: {', '.join(sections)})")
    return validate(params, sections, source=path)
