"""`section.key=value` overrides of params.yaml, as grid rows, `--set` and DVC's `-S` give
them: apply them to a base and validate; write a value back in DVC's -S (Hydra) syntax.

Not a stage's import: an edit here does not make DVC re-run the stages."""
import copy

import yaml

from ablation.core.cli import UserError, bounded, read_config
from ablation.training.params import SCHEMA, validate


def read_params(params_path):
    """The params file as a mapping, unvalidated: rows override it, then it is validated."""
    p = read_config(params_path)
    if not isinstance(p, dict):
        raise UserError(f"{params_path}: expected a mapping of sections ({', '.join(SCHEMA)})")
    return p


def known(dotted=""):
    """What a parameter name may be: the keys of its section, or the sections."""
    sec = str(dotted).partition(".")[0]
    if sec in SCHEMA:
        return [f"{sec}.{k}" for k in SCHEMA[sec]]
    return [f"{s}.*" for s in SCHEMA]


def apply(base, overrides, where):
    """base params with `section.key` overrides applied and validated; UserError names the row."""
    p = copy.deepcopy(base)
    for dotted, value in overrides.items():
        sec, _, key = str(dotted).partition(".")
        if sec not in SCHEMA or key not in SCHEMA[sec]:
            raise UserError(f"{where}: unknown parameter {bounded(repr(dotted), 60)} "
                            f"(known: {', '.join(known(dotted))})")
        if not isinstance(p.get(sec), dict):
            raise UserError(f"{where}: params.yaml has no section '{sec}' to override")
        p[sec][key] = value
    try:
        return validate(p, list(SCHEMA), source="params.yaml")
    except UserError as e:
        raise UserError(f"{where}: {str(e).removeprefix('params.yaml: ')}") from None


def get(params, dotted):
    """params['section']['key'] of 'section.key'."""
    sec, _, key = dotted.partition(".")
    return params[sec][key]


def parse_set(items):
    """{'section.key': value} of `--set KEY=VALUE` arguments, each value read as YAML."""
    out = {}
    for s in items or []:
        k, eq, v = s.partition("=")
        if not eq:
            raise UserError(f"--set {bounded(repr(s), 100)}: expected KEY=VALUE, e.g. "
                            f"train.epochs=1")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise UserError(f"--set {bounded(repr(s), 100)}: the value is not YAML "
                            f"({bounded(getattr(e, 'problem', None) or e, 80)})") from None
    return out


def fmt_value(v):
    """A value in DVC's -S (Hydra override) syntax."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)
