"""dvc.yaml says the truth: each stage depends on every module it imports and on exactly the
params it reads, so editing either re-runs the stage and committed metrics match the code."""
import ast
import os
import re

import pytest
import yaml

from ablation.training import params

from .helpers import ROOT
from .imports import closure, files, path_of

STAGE_MODULE = {s: f"ablation.stages.{s}" for s in ("prepare", "train", "svm", "export")}


def sections_loaded(module):
    """The params sections a stage module loads: the literal lists it passes to params.load
    (imported as load_params), read from its source, not typed here."""
    with open(path_of(module)) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params" \
                and node.args and isinstance(node.args[0], ast.List):
            out |= {e.value for e in node.args[0].elts}
    return sorted(out)


@pytest.fixture(scope="module")
def stages():
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        return yaml.safe_load(f)["stages"]


def test_import_walk_sees_what_train_uses():
    assert {m.removeprefix("ablation.") for m in closure("ablation.stages.train")} == {
        "ablation", "stages", "stages.train", "training", "training.engine", "training.models",
        "training.smallmaps", "training.params", "training.datasets", "training.live", "core",
        "core.cli", "core.cores", "core.io", "core.outputs"}


@pytest.mark.parametrize("stage", list(STAGE_MODULE))
def test_stage_modules_import_no_other_stage(stage):
    """Stages share the engine, io and the registries, never each other's code; benchmarks and
    the GPU check import no stage either (gpu_check runs the train stage as a program)."""
    stages = set(STAGE_MODULE.values())
    assert closure(STAGE_MODULE[stage]) & stages == {STAGE_MODULE[stage]}
    for tool in ("loop", "svm", "gpu_check"):
        assert not closure(f"ablation.bench.{tool}") & stages, tool


@pytest.mark.parametrize("stage", list(STAGE_MODULE))
def test_deps_are_the_import_closure(stages, stage):
    deps = {d for d in stages[stage]["deps"] if d.startswith("src/")}
    want = files(closure(STAGE_MODULE[stage]))
    assert deps == want


@pytest.mark.parametrize("stage", list(STAGE_MODULE))
def test_params_are_the_schema_keys_read(stages, stage):
    """Every key of the sections the stage loads, except the matrix lists that name stages."""
    st = stages[stage]
    matrix = {re.fullmatch(r"\$\{(.+)\}", v).group(1) for v in st.get("matrix", {}).values()}
    read = {f"{s}.{k}" if "." not in s else s
            for s in sections_loaded(STAGE_MODULE[stage])
            for k in (params.SCHEMA[s] if "." not in s else [None])}
    # the parse found the stage's params.load call (export reads the run's record, no params)
    assert stage in ("prepare", "export") or read
    assert set(st.get("params", [])) == read - matrix


@pytest.mark.parametrize("stage", ["train", "svm"])
def test_each_metrics_file_has_its_record_declared(stages, stage):
    """The run record the stage writes beside its metrics (io.record_path) is a declared,
    git-tracked output: experiments carry it, and the report reads it from them."""
    from ablation.core.outputs import record_path
    st = stages[stage]
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in st["metrics"]]
    outs = {next(iter(o)) if isinstance(o, dict) else o: o for o in st["outs"]}
    for m in metrics:
        rec = outs.get(record_path(m))
        assert rec is not None and rec[record_path(m)]["cache"] is False, m
