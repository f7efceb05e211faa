"""The package's layout is checked, not described: imports point down the layers (function-level
imports included), there are no cycles, modules and functions stay small, a run's name is
formatted and parsed in one place, and core.outputs names the files dvc.yaml names."""
import ast
import os
import re

import pytest
import yaml

from ablation.core import outputs
from ablation.record.run import Run, RunId

from .helpers import ROOT
from .imports import direct_imports, modules, path_of

# bottom first: a room imports only its own and those before it; bench imports any, none it
LAYERS = ("core", "training", "stages", "record", "grid", "gpu", "report", "search", "models")
APART = ("bench",)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
IDENTITY = "ablation.record.run"  # the one module that formats and parses run names


def room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_is_in_a_room():
    assert {room(m) for m in modules()} - {None} == set(LAYERS) | set(APART)
    top = [m for m in modules() if m.count(".") == 1 and room(m) not in LAYERS + APART]
    assert not top, f"modules outside the rooms: {top}"


def test_imports_point_down_the_layers():
    wrong = []
    for m in modules():
        if room(m) is None:
            continue
        for dep in direct_imports(m):
            r, d = room(m), room(dep)
            if d in APART and r not in APART:
                wrong.append(f"{m} -> {dep} (nothing imports the benchmarks)")
            elif r in LAYERS and d in LAYERS and LAYERS.index(d) > LAYERS.index(r):
                wrong.append(f"{m} -> {dep} ({d} is above {r})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: direct_imports(m) for m in modules()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_import_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walk itself: a function-level import is an edge (report -> figures is one)."""
    assert "ablation.report.figures" in direct_imports("ablation.report.command")
    assert "ablation.gpu.intake" in direct_imports("ablation.report.command")


@pytest.mark.parametrize("module", modules())
def test_module_and_function_sizes(module):
    with open(path_of(module)) as f:
        text = f.read()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{module}: {text.count(chr(10))} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: {', '.join(long)}"


def name_handling(tree):
    """Places in a module's source that split a name on '-' or slice an argument list by
    position: what only the identity module may do with run names."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                and n.func.attr in ("split", "rsplit", "partition", "rpartition") \
                and n.args and isinstance(n.args[0], ast.Constant) and n.args[0].value == "-":
            out.append(f"line {n.lineno}: .{n.func.attr}('-')")
        if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Slice) \
                and isinstance(n.value, ast.Name) and n.value.id in ("cmd", "argv", "args") \
                and isinstance(n.slice.lower, ast.Constant) and n.slice.lower.value:
            out.append(f"line {n.lineno}: {n.value.id}[{n.slice.lower.value}:]")
        if isinstance(n, ast.Name) and n.id == "SEED_RE":
            out.append(f"line {n.lineno}: SEED_RE")
    return out


def test_one_identity_parser():
    found = {}
    for m in modules():
        if m == IDENTITY:
            continue
        with open(path_of(m)) as f:
            hits = name_handling(ast.parse(f.read()))
        if hits:
            found[m] = hits
    assert not found, found


def test_the_identity_check_finds_what_it_forbids():
    tree = ast.parse("a = name.split('-')\nb = cmd[6:]\nc = SEED_RE.match(x)\n")
    assert len(name_handling(tree)) == 3


@pytest.mark.parametrize("rid", [
    RunId("table3", "r01"), RunId("table3", "r01", seed=2), RunId("t", "x1", "smoke", 0),
    RunId("table3", "r01", "nomomentum", 4, "train", "fashion_mnist", "resnet18"),
    RunId("table2", "rbf", None, None, "svm", "mnist", "rbf")])
def test_run_id_round_trips(rid):
    assert RunId.parse(rid.format()) == rid
    assert RunId.parse(rid.name) == rid.experiment


@pytest.mark.parametrize("text", ["", "table3", "table3-", "-r01", "a-b-c-d", "a-b-s1-s2",
                                  "a-b-s1-x", "a b-r1", "table3-r01:train@mnist",
                                  "table3-r01:dance@mnist-resnet18", "a-b-c-d-s1"])
def test_run_id_rejects_what_is_no_run(text):
    assert RunId.parse(text) is None


def test_run_record_round_trips():
    e = {"state": "success", "rev": "abc", "timestamp": "2026-12-01T00:00:00",
         "source": {"kind": "gpu-archive", "commit": "c0ffee"},
         "data": {"params": {"params.yaml": {"data": {"train": {"epochs": 1}}}},
                  "metrics": {"metrics/resnet/mnist/resnet18.json": {"data": {"host": "h"}}},
                  "curves": {"metrics/resnet/mnist/resnet18.json": {"1": 97.5}},
                  "sources": {"metrics/resnet/mnist/resnet18.json": "f00"}}}
    run = Run.from_dict("t-r1-s0", e)
    assert run.to_dict() == e
    assert run.curves["metrics/resnet/mnist/resnet18.json"] == {1: 97.5}
    assert run.id == RunId("t", "r1", seed=0) and run.imported
    assert run.units() == {"metrics/resnet/mnist/resnet18.json": ("train", "mnist", "resnet18")}
    assert run.provenance("metrics/resnet/mnist/resnet18.json")["how"] == "gpu-archive"


def substituted(text, item):
    return re.sub(r"\$\{item\.(\w+)\}", lambda m: item[m.group(1)], text)


@pytest.mark.parametrize("stage", ["train", "svm"])
def test_outputs_map_is_what_dvc_yaml_names(stage):
    """The paths core.outputs derives are the ones dvc.yaml's commands and outs name."""
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        st = yaml.safe_load(f)["stages"][stage]
    name = "model" if stage == "train" else "kernel"
    item = {"dataset": "mnist", name: "resnet18" if stage == "train" else "rbf"}
    cmd = substituted(st["cmd"], item).split()
    arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    m = outputs.metrics_path(stage, "mnist", item[name])
    assert arg["--metrics"] == m
    assert arg["--out"] == outputs.model_path(stage, "mnist", item[name])
    outs = {substituted(next(iter(o)) if isinstance(o, dict) else o, item) for o in st["outs"]}
    assert outputs.record_path(m) in outs
    assert outputs.parse_metrics_path(m) == (stage, "mnist", item[name])
    if stage == "train":
        assert arg["--ckpt"] == outputs.ckpt_path("mnist", "resnet18")
        assert arg["--live"] == outputs.live_dir(m)
        assert any(outputs.curve_path(m).startswith(o) for o in outs)


def test_export_paths_are_what_dvc_yaml_names():
    """The export stage reads the train stage's weights and writes the folder core.outputs
    names, which dvc.yaml's artifacts entry for the model points at."""
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        doc = yaml.safe_load(f)
    st = doc["stages"]["export"]
    item = {"dataset": "mnist", "model": "resnet18"}
    cmd = substituted(st["cmd"], item).split()
    arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert arg["--weights"] == outputs.model_path("train", "mnist", "resnet18")
    assert arg["--out"] == outputs.export_dir("mnist", "resnet18")
    assert [substituted(o, item) for o in st["outs"]] == [arg["--out"]]
    name = outputs.artifact_name("train", "mnist", "resnet18")
    assert doc["artifacts"][name]["path"] == arg["--out"]
