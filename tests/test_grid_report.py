"""Grid files, the queue command and the report: unit tests and one real end-to-end queue."""
import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime

import pytest

from ablation.core.cli import UserError
from ablation.grid import queue as Q
from ablation.grid import schema as G
from ablation.record import dvc as D
from ablation.record import store
from ablation.record.run import Run, RunId
from ablation.report import claims, command, figures
from ablation.report import headline as opening
from ablation.report import tables as report
from ablation.report.format import signed

from .helpers import PARAMS, ROOT, warm_exp_cache

FIX = os.path.join(ROOT, "tests", "fixtures")


def load(tmp_path, text, **kw):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    return G.load(str(p), params_path=PARAMS, **kw)


@pytest.mark.parametrize("name,rows", [("table1", 8), ("table2", 4), ("table3", 13)])
def test_study_grids_parse_with_the_studys_rows(name, rows):
    g = G.load(os.path.join(ROOT, "grids", f"{name}.yaml"), params_path=PARAMS)
    assert len(g["rows"]) == rows
    for r in g["rows"]:  # every study figure belongs to a declared column
        assert set(r["study"]) <= {c["label"] for c in g["columns"]}


def test_table1_rows_are_rows_not_a_factorial():
    g = G.load(os.path.join(ROOT, "grids", "table1.yaml"), params_path=PARAMS)
    combos = {(r["params"]["train"]["optimizer"], r["params"]["train"]["lr"],
               r["params"]["train"]["epochs"], r["params"]["train"]["pin_memory"])
              for r in g["rows"]}
    assert len(combos) == 4  # optimizer, lr, epochs, pin_memory move together
    assert g["rows"][0]["params"]["train"]["models"] == ["resnet18", "resnet50"]


def test_plan_builds_argument_lists_with_seeds():
    g = G.load(os.path.join(ROOT, "grids", "table3.yaml"), params_path=PARAMS)
    runs = G.plan(g, seeds=2)
    assert len(runs) == 26  # 13 rows: the study's 10 and the ResNet-18 twins x01-x03
    name, seed, cmd = runs[1].name, runs[1].seed, runs[1].queue_cmd()
    assert name == "table3-r01-s1" and seed == 1 and runs[1].params["train"]["seed"] == 1
    assert runs[1].id == RunId("table3", "r01", seed=1) and not runs[1].overwrite
    assert cmd == ["dvc"] + runs[1].queue_args()  # what `queue` prints is what it runs
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "table3-r01-s1"]
    assert "train.models=[resnet18]" in cmd and "train.pin_memory=true" in cmd
    assert "train.seed=1" in cmd and cmd[-1] == "train"


def test_factorial_shorthand(tmp_path):
    g = load(tmp_path, "name: f\nfactorial:\n  train.lr: [0.1, 0.01]\n"
                       "  train.batch_size: [16, 32, 64]\n")
    assert [r["id"] for r in g["rows"]] == [f"r{i:02d}" for i in range(1, 7)]
    assert g["rows"][5]["params"]["train"]["batch_size"] == 64


@pytest.mark.slow
def test_dry_run_prints_and_queues_nothing(tmp_path, capsys):
    g = load(tmp_path, "name: d\nrows:\n  - {id: a, set: {train.lr: 0.5}}\n")
    assert Q.queue(g, seeds=None, dry_run=True) == ["d-a"]
    assert "dvc exp run --queue -n d-a -S train.lr=0.5" in capsys.readouterr().out


def test_a_run_in_the_committed_record_is_not_run_again(tmp_path, capsys, monkeypatch):
    """A fresh clone, no experiments, and reports/<grid>.json holding finished runs from
    another machine: a recorded run whose params are the plan's is skipped, one whose plan
    changed since is re-run, the rest run (queue, run and sbatch share this)."""
    g = load(tmp_path, "name: d\nrows:\n  - {id: a, set: {train.lr: 0.5}}\n  - {id: b}\n")
    jobs = {j.name: j for j in G.plan(g, 2)}
    changed = copy.deepcopy(jobs["d-b-s1"].params)
    changed["train"]["lr"] = 0.9

    def recorded(name, params):
        return Run(name, "success", rev="c" * 40, timestamp="2026-12-02T04:00:00",
                   params=params, metrics={"metrics/resnet/mnist/resnet18.json": {
                       "test_accuracy": 99.0}})
    monkeypatch.chdir(tmp_path)
    os.mkdir("reports")
    store.save(os.path.join("reports", "d.json"), "d", {
        "d-a-s0": recorded("d-a-s0", jobs["d-a-s0"].params),
        "d-b-s1": recorded("d-b-s1", changed)})
    monkeypatch.setattr(Q, "experiments", dict)  # nothing ran here
    todo = Q.to_run(g, 2, Q.known_runs(g))
    assert sorted(j.name for j in todo) == ["d-a-s1", "d-b-s0", "d-b-s1"]
    out = capsys.readouterr().out
    assert "skip d-a-s0: already success" in out
    assert "re-run d-b-s1 (plan changed since it ran: train.lr 0.9 -> " in out
    assert Q.to_run(g, 2, Q.known_runs(g), force=True)[0].name == "d-a-s0"


@pytest.mark.parametrize("text,expect", [
    ("name: x\nrows: [1, 2\n", "YAML syntax error"),
    ("[1, 2]\n", "expected a mapping"),
    ("rows: []\n", "missing key 'name'"),
    ("name: x-y\nrows: [{id: a}]\n", "name = 'x-y': allowed: letters"),
    ("name: x\n", "exactly one of 'rows'"),
    ("name: x\nrows: []\n", "rows = []: allowed: a non-empty list"),
    ("name: x\ncolour: red\nrows: [{id: a}]\n", "unknown key 'colour'"),
    ("name: x\nrows: [{id: a}, {id: a}]\n", "must be unique"),
    ("name: x\nrows: [{id: a, set: {train.learning_rate: 1}}]\n",
     "row a: unknown parameter 'train.learning_rate' (known: train.models"),
    ("name: x\nrows: [{id: a, set: {train.optimizer: rmsprop}}]\n",
     "row a: train.optimizer = 'rmsprop': allowed: one of sgd, adam"),
    ("name: x\nrows: [{id: a, set: {train.batch_size: [16, 32]}}]\n", "train.batch_size"),
    ("name: x\nrows: [{id: a, study: {acc: 1}}]\n", "study value for unknown column 'acc'"),
    ("name: x\ncolumns: [{label: a}]\nrows: [{id: a}]\n", "exactly one of 'param' or 'metric'"),
    ("name: x\nfactorial: {train.lr: 0.1}\n", "factorial = {'train.lr': 0.1}: allowed: a mapping"),
    ("name: x\nrows: [{id: a, colour: 1}]\n", "unknown key 'rows[1].colour' (allowed keys: id"),
])
def test_malformed_grid_is_one_clear_error(tmp_path, text, expect):
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert str(e.value).startswith(str(tmp_path / "g.yaml")) and expect in str(e.value)


def test_grid_cli_bad_file_exit_2(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: x\nrows: [{id: a, set: {train.lr: -1}}]\n")
    r = subprocess.run([sys.executable, "-m", "ablation.grid", "queue", str(p)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "row a: train.lr = -1: allowed: a number > 0" in r.stderr


def test_report_layout_from_recorded_exp_show(tmp_path):
    """A recorded `dvc exp show --json`: one success, one diverged, one failed, one missing."""
    with open(os.path.join(FIX, "exp_show_tiny.json")) as f:
        exps = D.newest(json.load(f))
    text = open(os.path.join(FIX, "grid_tiny.yaml")).read()
    text += "  - {id: d, set: {train.lr: 0.01}}\n"
    g = load(tmp_path, text)
    md, _ = report.build(g, exps)
    lines = md.splitlines()
    i = lines.index("| row | state | lr | acc % (ours) | study | Δ | img/s |")
    rows = [line.split(" | ") for line in lines[i + 2:i + 6]]
    assert [r[0].strip("| ") for r in rows] == ["a", "b", "c", "d"]
    assert rows[0][1] == "ok" and rows[0][3] == "25.13" and rows[0][5] == "-24.87"
    assert rows[1][1] == "DIVERGED (1/1)" and rows[1][3] == "—"
    assert rows[2][1] == "needs a GPU (FAILED (1/1))"  # planned for cuda, failed here
    assert rows[3][1] == "not queued (1/1)"
    assert "`tiny-c`" in md


def test_gpu_rows_without_a_run_say_so_with_the_command(tmp_path):
    """A row planned for cuda that has not run is `needs a GPU`, not a failure: with what was
    tried in brackets, and the exact command under the table; CPU rows keep their states."""
    with open(os.path.join(FIX, "exp_show_tiny.json")) as f:
        exps = D.newest(json.load(f))
    text = open(os.path.join(FIX, "grid_tiny.yaml")).read()
    text += "  - {id: g1, set: {train.device: cuda, train.lr: 0.02}}\n"
    g = load(tmp_path, text)
    md, _ = report.build(g, exps)
    states = {line.split(" | ")[0].strip("| "): line.split(" | ")[1]
              for line in md.splitlines() if line.startswith("| ") and " | " in line}
    assert states["g1"] == "needs a GPU"  # never tried
    assert states["c"] == "needs a GPU (FAILED (1/1))"  # tried on this CPU machine
    assert states["a"] == "ok" and states["b"] == "DIVERGED (1/1)"
    assert "Rows that need a GPU (c, g1) have not run; on a lent GPU machine without DVC: " \
        "`bash bench/gpu_study.sh`" in md
    assert (f"on a machine or Ray cluster with one: `python -m ablation.grid run "
            f"{tmp_path / 'g.yaml'} --rows c g1`") in md


def test_rows_selects_and_unknown_row_is_one_clear_error(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: s\nrows:\n  - {id: a, set: {train.lr: 0.5}}\n"
                 "  - {id: b, set: {train.lr: 0.25}}\n  - {id: c, set: {train.lr: 0.125}}\n")

    def grid_cli(*args):
        return subprocess.run([sys.executable, "-m", "ablation.grid", "show", str(p), *args],
                              cwd=ROOT, capture_output=True, text=True)
    r = grid_cli("--rows", "c", "a", "--seeds", "2")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["s-a-s0", "s-a-s1",
                                                                  "s-c-s0", "s-c-s1"]
    bad = grid_cli("--rows", "z")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--rows 'z': no such row (allowed: a, b, c)" in bad.stderr


def test_report_mean_and_interval_over_seeds():
    text, mean = report.cell([99.0, 99.2, 99.4], ".2f")
    assert text == "99.20 [98.70 – 99.70] (n=3)" and mean == pytest.approx(99.2)
    assert report.cell([], ".2f") == ("—", None)


@pytest.mark.parametrize("v,spec,text", [
    (1878548.2, ",.0f", "+1,878,548"), (0.27, ".2f", "+0.27"), (-0.5, ".1f", "-0.5"),
    (1500.0, None, "+1,500"), (-0.00012, None, "-0.00012"), (2.5, ">6.1f", "  +2.5"),
    (None, ".2f", "—"), (float("nan"), ".2f", "NaN"), (-0.001, ".2f", "0.00"),
    (0.004, ".2f", "0.00"), (-0.3, ",.0f", "0"), (-1e-9, None, "-1e-09")])
def test_delta_reads_like_its_column_with_a_sign(v, spec, text):
    assert signed(v, spec) == text


def start_queue(cwd, env, jobs):
    """`dvc queue start -j jobs`, its output to /dev/null: the workers it spawns inherit its
    stdout, so capturing it would wait for the workers to exit (one idle worker once never
    did, and the test hung); _wait_queue then polls, and stop_queue ends the workers."""
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _task_running(cwd):
    """Whether a queue task of the repository at `cwd` runs now: a `dvc exp exec-run` whose
    infofile lies in its .dvc/tmp. A scan of /proc: a `dvc queue status` every few seconds
    costs a second of CPU each, taken from the runs on a 2-core machine."""
    needle = os.path.join(os.path.realpath(cwd), ".dvc", "tmp", "").encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"exec-run" in cmd and needle in cmd:
            return True
    return False


def _wait_queue(cwd, env, timeout=600):
    """Wait until no task of the queue is queued or running (DVC's own status says so), then
    stop its workers; returns that status."""
    t0, status = time.time(), "(no status read: a task ran all along)"
    while time.time() - t0 < timeout:
        if _task_running(cwd):
            time.sleep(0.5)
            continue
        r = subprocess.run(["dvc", "queue", "status"], cwd=cwd, env=env, capture_output=True,
                           text=True)
        if " Queued" not in r.stdout and " Running" not in r.stdout:
            subprocess.run(["dvc", "queue", "stop"], cwd=cwd, env=env, capture_output=True)
            return r.stdout
        status = r.stdout
        time.sleep(3)
    # never leave queue workers behind a failed test: stop them, then fail
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=cwd, env=env, capture_output=True)
    raise AssertionError(f"queue did not finish in {timeout} s:\n{status}")


def fake_exp(params, metrics, state="success", ts="2026-01-01T10:00:00"):
    """An experiment in the JSON form of a run (`dvc exp show --json`, flattened; what
    reports/<grid>.json keeps): recorded params and metrics files."""
    return {"state": state, "rev": None, "timestamp": ts, "log": None,
            "data": {"params": {"params.yaml": {"data": params}},
                     "metrics": {path: {"data": m} for path, m in metrics.items()}}}


def as_runs(exps):
    """{name: Run} of {name: experiment dict}."""
    return {n: Run.from_dict(n, e) for n, e in exps.items()}


def test_overlapping_runs_are_marked(tmp_path):
    g = load(tmp_path, "name: o\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns: [{label: acc, metric: test_accuracy}]\n"
                       "rows: [{id: a}, {id: b}, {id: c}]\n")

    def exp(end, train_s, ms=None):
        m = {"test_accuracy": 90.0, "train_time_ms": ms or 1000 * train_s, "eval_time_ms": 0.0,
             "timed_end": end + "+00:00"}
        return fake_exp(g["rows"][0]["params"], {"metrics/resnet/mnist/resnet18.json": m},
                        ts="2026-01-02T00:00:00")  # committed later, all at once (a restore)
    exps = {"o-a": exp("2026-01-01T10:00:00", 60),   # 09:59:00 - 10:00:00
            "o-b": exp("2026-01-01T10:00:30", 60),   # 09:59:30 - 10:00:30: overlaps a
            "o-c": exp("2026-01-01T10:02:00", 60)}   # 10:01:00 - 10:02:00: alone
    md, _ = report.build(g, as_runs(exps))
    states = {line.split(" | ")[0].strip("| "): line.split(" | ")[1]
              for line in md.splitlines()
              if line.startswith("| ") and not line.startswith("| row")}
    assert states == {"a": "ok, overlapped (1/1)", "b": "ok, overlapped (1/1)", "c": "ok"}
    assert "not on record" not in md


def test_an_overlapped_run_keeps_its_accuracy_and_loses_its_timing(tmp_path):
    """Seeds 0 and 1 of one row timed at once (-j 2), seed 2 alone: the time cell is seed 2's
    alone, the accuracy over all three, and the line says overlapped (2/3)."""
    g = load(tmp_path, "name: o\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns:\n  - {label: acc, metric: test_accuracy, fmt: .2f}\n"
                       "  - {label: time ms, metric: train_time_ms, fmt: ',.0f'}\n"
                       "rows: [{id: a}]\n")

    def exp(end, acc, ms):
        m = {"test_accuracy": acc, "train_time_ms": ms, "eval_time_ms": 0.0,
             "timed_end": end, "other_load_cores": 0.01}
        return fake_exp(g["rows"][0]["params"], {"metrics/resnet/mnist/resnet18.json": m})
    runs = as_runs({"o-a-s0": exp("2026-01-01T10:00:00", 90.0, 120000.0),
                    "o-a-s1": exp("2026-01-01T10:01:00", 91.0, 110000.0),
                    "o-a-s2": exp("2026-01-01T12:00:00", 92.0, 60000.0)})
    (key, cells), = table_rows(report.build(g, runs)[0]).items()
    assert key == ("a", "ok, overlapped (2/3)")
    assert cells[2].startswith("91.00 [") and cells[2].endswith("(n=3)")
    assert cells[5] == "60,000"  # seed 2 alone: one value, no interval


def test_a_restored_run_is_placed_where_it_trained(tmp_path):
    """A run DVC restored from its run cache: committed at 10:00:30 (beside b's timed work),
    but its record says its timed work ended at 09:00:00, so it overlaps nothing; b is alone
    too. A record without `timed_end` cannot be placed (its commit time is no stand-in: a
    restore is committed long after it trained), so it is marked neither way and named under
    the full table."""
    g = load(tmp_path, "name: o\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns: [{label: acc, metric: test_accuracy}]\n"
                       "rows: [{id: a}, {id: b}]\n")

    def exp(ts, end=None):
        m = {"test_accuracy": 90.0, "train_time_ms": 60000.0, "eval_time_ms": 0.0,
             **({"timed_end": end} if end else {})}
        return fake_exp(g["rows"][0]["params"], {"metrics/resnet/mnist/resnet18.json": m},
                        ts=ts)
    md, _ = report.build(g, as_runs({"o-a": exp("2026-01-01T10:00:30", "2026-01-01T09:00:00"),
                                     "o-b": exp("2026-01-01T10:00:00")}))
    assert {k[0]: k[1] for k in table_rows(md)} == {"a": "ok", "b": "ok"}
    md, _ = report.build(g, as_runs({"o-a": exp("2026-01-01T10:00:30"),
                                     "o-b": exp("2026-01-01T10:00:00")}))
    assert {k[0]: k[1] for k in table_rows(md)} == {"a": "ok", "b": "ok"}
    assert ("Load and timing window not on record for 2 of 2 finished runs (recorded before "
            "runs measured them): no `loaded` or `overlapped` mark can be given or ruled out, "
            "so their timings count: `o-a`, `o-b`.") in md


def test_a_loaded_run_keeps_its_accuracy_and_loses_its_timing(tmp_path):
    """Seed 1 of a trained while other processes kept 0.9 cores busy (its record says so): the
    line is marked `loaded (1/3)`, the time cell is over seeds 0 and 2 alone, the accuracy
    over all three; at 0.25 cores (the limit itself) nothing is left out."""
    g = load(tmp_path, "name: l\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns:\n  - {label: acc, metric: test_accuracy, fmt: .2f}\n"
                       "  - {label: time ms, metric: train_time_ms, fmt: ',.0f'}\n"
                       "rows: [{id: a}]\n")

    def runs(load1):
        def exp(day, acc, ms, load):
            m = {"test_accuracy": acc, "train_time_ms": ms, "eval_time_ms": 0.0,
                 "other_load_cores": load}
            return fake_exp(g["rows"][0]["params"], {"metrics/resnet/mnist/resnet18.json": m},
                            ts=f"2026-01-0{day}T10:00:00")
        return as_runs({"l-a-s0": exp(1, 90.0, 100000.0, 0.01),
                        "l-a-s1": exp(2, 91.0, 300000.0, load1),
                        "l-a-s2": exp(3, 92.0, 102000.0, 0.02)})
    rows = table_rows(report.build(g, runs(0.9))[0])
    (key, cells), = rows.items()
    assert key == ("a", "ok, loaded (1/3)")
    assert cells[2].startswith("91.00 [") and cells[2].endswith("(n=3)")
    assert cells[5].startswith("101,000 [") and cells[5].endswith("(n=2)")  # acc, study, Δ, time
    (key, cells), = table_rows(report.build(g, runs(0.25))[0]).items()
    assert key == ("a", "ok") and cells[5].startswith("167,333 [")
    assert "not on record" not in report.build(g, runs(0.9))[0]
    old = runs(0.9)  # seed 1 recorded before runs measured their load
    del old["l-a-s1"].metrics["metrics/resnet/mnist/resnet18.json"]["other_load_cores"]
    for md in (report.build(g, old)[0], report.build(g, runs(None))[0]):
        assert ("Load and timing window not on record for 1 of 3 finished runs (recorded "
                "before runs measured them): no `loaded` or `overlapped` mark can be given or "
                "ruled out, so their timings count: `l-a-s1`.") in md
        assert table_rows(md)[("a", "ok")][5].endswith("(n=3)")  # its timing kept, unmarked


def full_table(md):
    """The part of a report from its full table on (the headline comes before it)."""
    return md.split("<summary>Full table", 1)[-1]


def table_rows(md):
    """{(row id, state): cells} of a report's full table (the results; the forecast against
    actual, where there is one, comes after it)."""
    md = full_table(md)
    table = md.split("\n\n| row")[1].split("\n\n")[0] if "\n\n| row" in md else md
    rows = [line.strip("| ").split(" | ") for line in ("| row" + table).splitlines()
            if line.startswith("| ") and not line.startswith("| row")]
    return {(r[0], r[1]): r for r in rows}


def test_report_cells_come_from_the_record_not_the_plan(tmp_path):
    """Row a ran as planned; row b's record says epochs 1 (params.yaml was edited after it ran);
    row a also has a --set variant `smoke`. Parameter columns show what ran; only the planned
    run is compared with the study; the others say what differs."""
    g = load(tmp_path, "name: t\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns:\n  - {label: epochs, param: train.epochs}\n"
                       "  - {label: acc, metric: test_accuracy, fmt: .1f}\n"
                       "rows: [{id: a, study: {acc: 99.0}}, {id: b, study: {acc: 99.0}}]\n")
    plan = g["rows"][0]["params"]
    smoke = json.loads(json.dumps(plan))
    smoke["train"]["epochs"], smoke["data"]["train_limit"] = 1, 300
    stale = json.loads(json.dumps(plan))
    stale["train"]["epochs"] = 1
    path = "metrics/resnet/mnist/resnet18.json"
    exps = {"t-a-s0": fake_exp(plan, {path: {"test_accuracy": 98.0}}),
            "t-a-s1": fake_exp(plan, {path: {"test_accuracy": 99.0}}),
            "t-a-smoke": fake_exp(smoke, {path: {"test_accuracy": 30.0}}),
            "t-b": fake_exp(stale, {path: {"test_accuracy": 40.0}}),
            "t-bx": fake_exp(plan, {path: {"test_accuracy": 1.0}})}  # another row's name
    md, frame = report.build(g, as_runs(exps))
    rows = table_rows(md)
    assert rows[("a", "ok")][2:] == ["5", "98.5 [92.1 – 104.9] (n=2)", "99.0 ∈", "-0.5"]  # .1f
    assert rows[("a", "ok; smoke: train_limit 300, epochs 1")][2:] == ["1", "30.0", "99.0", "—"]
    assert rows[("b", "ok; differs from plan: epochs 1")][2:] == ["1", "40.0", "99.0", "—"]
    assert rows[("b", "not queued (1/1)")][2:] == ["5", "—", "99.0", "—"]  # the plan as it is now
    assert len(rows) == 4 and "1.0" not in md
    assert sorted(frame["name"]) == ["t-a-s0", "t-a-s1", "t-a-smoke", "t-b"]


def head_grid(tmp_path):
    """Rows that differ in lr, batch, optimizer, epochs and momentum (5 params: one more than
    the headline's 8 columns hold), alike in pin_memory; c is planned for a GPU."""
    rows = (("a", "lr: 0.01", "acc: 92.0, time ms: 100000, GFLOPs: 0.0332"),
            ("b", "lr: 0.001, train.batch_size: 32, train.optimizer: sgd, train.epochs: 3, "
                  "train.momentum: 0.5", "acc: 91.0, GFLOPs: 0.0699"),
            ("c", "lr: 0.001, train.device: cuda", "acc: 93.0"))
    return load(tmp_path, "name: h\ntitle: Head\ntargets: [train]\n"
                          "set: {data.datasets: [mnist], train.pin_memory: false}\ncolumns:\n"
                          + "".join(f"  - {{label: {p}, param: train.{p}}}\n" for p in (
                              "lr", "batch_size", "optimizer", "epochs", "momentum",
                              "pin_memory"))
                          + "  - {label: acc, metric: test_accuracy, fmt: .2f}\n"
                          "  - {label: time ms, metric: train_time_ms, fmt: ',.0f'}\n"
                          "  - {label: GFLOPs, metric: gflops, fmt: .4f}\nrows:\n"
                          + "".join(f"  - {{id: {r}, set: {{train.{s}}}, study: {{{f}}}}}\n"
                                    for r, s, f in rows))


def head_runs(g):
    """a: 3 seeds, the third on another CPU; b: 2 seeds on one CPU (one left its ISA
    unrecorded: no difference); GFLOPs the same every seed of a row."""
    rows = {r["id"]: r["params"] for r in g["rows"]}

    def run(day, rid, acc, ms, gflops, cpu, isa):  # a run a day: none overlaps another
        return fake_exp(rows[rid], {"metrics/resnet/mnist/resnet18.json": {
            "test_accuracy": acc, "train_time_ms": ms, "gflops": gflops, "device_name": cpu,
            "cpu_isa": isa, "threads": 2}}, ts=f"2026-01-0{day}T10:00:00")
    return as_runs({"h-a-s0": run(1, "a", 90.8, 101000, 0.0331, "CPU A", "AVX2"),
                    "h-a-s1": run(2, "a", 91.0, 102000, 0.0331, "CPU A", "AVX2"),
                    "h-a-s2": run(3, "a", 91.2, 103000, 0.0331, "CPU B", "AVX512"),
                    "h-b-s0": run(4, "b", 89.0, 50000, 0.0698, "CPU A", None),
                    "h-b-s1": run(5, "b", 90.0, 60000, 0.0698, "CPU A", "AVX2")})


def plain(md):
    """Markdown with the headline's joined dash (no-break spaces, word joiner) as typed."""
    return md.replace("\u00a0", " ").replace("\u2060", "")


def test_headline_shows_what_differs_and_the_verdict(tmp_path):
    """The headline: the row (its state where not ok), the params that differ (a column each
    where 8 columns hold them, else one `setting` column, a name without its label; those
    alike named once), then ours,
    the study's figure and the verdict report.claims gave; † where a mean's seeds ran on two
    CPUs."""
    g = head_grid(tmp_path)
    t = report.tabulate(g, head_runs(g))
    md = plain(opening.headline(t, {("a", "acc"): "beyond noise", ("b", "acc"): "within noise"}))
    lines = md.splitlines()
    assert lines[:3] == ["# Head", "", "| row | setting | acc (ours) | study | ours vs study |"]
    assert lines[4:7] == [
        "| a | lr 0.01, batch_size 16, adam, epochs 5, momentum 0.9 | "
        "91.00 [90.50 – 91.50] (n=3)† | 92.00 | beyond noise |",
        "| b | lr 0.001, batch_size 32, sgd, epochs 3, momentum 0.5 | "
        "89.50 [83.15 – 95.85] (n=2) | 91.00 | within noise |",
        "| c (needs a GPU) | lr 0.001, batch_size 16, adam, epochs 5, momentum 0.9 | "
        "— | 93.00 | — |"]
    assert "All rows: pin_memory False." in md
    few = plain(opening.headline(report.tabulate(dict(g, rows=g["rows"][:1]), head_runs(g)), {}))
    assert few.splitlines()[2] == "| row | acc (ours) | study | ours vs study |"  # none differ
    assert ("† seeds ran on more than one machine or kernel setting (a: CPU A, AVX2, 2 threads "
            "/ CPU B, AVX512, 2 threads): on CPU") in md
    assert md.count("†") == 2  # a's mean and the footnote: b's ISA unrecorded is no difference


def test_full_table_lists_columns_equal_in_every_run_under_it(tmp_path):
    """The full table: every line and column but those that give one value in every run of a
    line (GFLOPs), listed under it with the study's; Δ in its column's format, with a sign."""
    g = head_grid(tmp_path)
    md, _ = report.build(g, head_runs(g))
    assert md.startswith("\n<details><summary>Full table: every column, every line</summary>"
                         "\n\n| row | state | lr | batch_size | optimizer | epochs | momentum | "
                         "pin_memory | acc (ours) | study | Δ | time ms (ours) | study | Δ |\n")
    rows = table_rows(md)
    assert rows[("a", "ok")][8:] == ["91.00 [90.50 – 91.50] (n=3)†", "92.00 ∉", "-1.00",
                                     "102,000 [99,516 – 104,484] (n=3)†", "100,000 ∈", "+2,000"]
    assert "- GFLOPs: a: 0.0331 (study 0.0332); b: 0.0698 (study 0.0699)\n" in md
    assert "\n\n</details>\n" in md and "Rows that need a GPU (c) have not run" in \
        md.split("</details>")[1]


def test_study_figures_list_columns_equal_in_every_seed_under_their_table(tmp_path):
    """Ours against the study's figures: a column with one value in every seed of each row
    (GFLOPs) is not tested, so it is not a line of the table but one line under it."""
    g = head_grid(tmp_path)
    sec = claims.section(g, report.build(g, head_runs(g))[1])
    figures = sec.split("### Ours against the study's figures")[1]
    assert [r[:2] for r in (line.strip("| ").split(" | ") for line in figures.splitlines()
                            if line.startswith("| ") and "---" not in line)][1:] == [
        ["a", "acc"], ["a", "time ms"], ["b", "acc"]]  # b has no study time
    assert figures.endswith("\n- GFLOPs: a: 0.0331 (study 0.0332); b: 0.0698 (study 0.0699)\n")


def test_report_opens_with_the_answer_and_ends_with_its_method(tmp_path):
    """command.page: headline, the note (folded), Conclusions, the full table (folded), the
    Method section with the legends last; no legend above the headline."""
    g = head_grid(tmp_path)
    g["note"] = "Ran on two CPUs."
    t = report.tabulate(g, head_runs(g))
    md = plain(command.page(g, t))
    order = ["# Head\n\n| row |", "<details><summary>Notes on the runs</summary>\n\n"
             "Ran on two CPUs.\n\n</details>", "\n## Conclusions\n",
             "<details><summary>Full table", "\n## Method\n\nThe table at the top"]
    at = [md.index(x) for x in order]
    assert at == sorted(at) and at[0] == 0
    verdict = claims.row_verdicts(g, t.frame)[("a", "acc")]  # "within noise" or "beyond ..."
    assert f"| a | lr 0.01, batch_size 16, adam, epochs 5, momentum 0.9 | " \
        f"91.00 [90.50 – 91.50] (n=3)† | 92.00 | {verdict} |" in md and verdict.endswith("noise")
    assert "State: `ok` finished" in md[at[-1]:] and "State:" not in md[:at[-1]]


def test_failed_run_shows_no_numbers(tmp_path):
    """DVC gives a failed experiment its parent's metrics; the report shows none of them."""
    g = load(tmp_path, "name: f\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns: [{label: acc, metric: test_accuracy}]\nrows: [{id: a}]\n")
    with open(os.path.join(FIX, "exp_show_tiny.json")) as f:
        doc = json.load(f)
    failed = D.newest(doc)["tiny-c"]
    assert failed.state == "failed" and failed.metrics == {}  # not its parent's numbers
    rows = table_rows(report.build(g, {"f-a": failed})[0])
    assert rows[("a", "FAILED (1/1)")][2] == "—"


@pytest.mark.parametrize("column,expect", [
    ("{label: x, metric: test_acc}", "column 'x': unknown metric 'test_acc' of stage train "
                                     "(allowed: test_accuracy, train_time_ms"),
    ("{label: x, metric: 'resnet/{dataset}/{model}.test_accuracy'}", "unknown metric"),
    ("{label: x, metric: test_accuracy, stage: train, kernel: rbf}",
     "column 'x': 'kernel' does not apply to stage train"),
    ("{label: x, metric: test_accuracy, model: vgg}",
     "columns[1].model = 'vgg': allowed: one of resnet18"),
    ("{label: x, metric: test_accuracy}", "row a: column 'x' reads one dataset but the row runs "
                                          "mnist, fashion_mnist (name one with dataset:)"),
    ("{label: x, metric: test_accuracy, dataset: mnist, model: resnet50}",
     "row a: column 'x' reads model resnet50, which the row does not run (models: resnet18)"),
])
def test_bad_metric_column_is_one_clear_error(tmp_path, column, expect):
    text = f"name: c\ntargets: [train]\ncolumns: [{column}]\nrows: [{{id: a}}]\n"
    with pytest.raises(UserError) as e:
        load(tmp_path, text)
    assert expect in str(e.value)


def test_set_makes_a_named_variant(tmp_path, capsys):
    g = load(tmp_path, "name: v\nrows: [{id: a}]\n", extra_set={"train.epochs": 1}, tag="smoke")
    assert [r.name for r in G.plan(g, seeds=2)] == ["v-a-smoke-s0", "v-a-smoke-s1"]
    assert RunId.parse("v-a-smoke-s1") == RunId("v", "a", "smoke", 1)
    assert RunId.parse("v-a") == RunId("v", "a")
    assert not RunId.parse("v-ab").of_row("v", "a")  # another row's name, not a run of a
    assert G.variants_of(g, "v-a-smoke-s1") == {"smoke"} and G.variants_of(g, "v-a") == {None}
    assert G.variants_of(g, "v-ab") == set()
    h = load(tmp_path, "name: v\nrows: [{id: a}]\n", extra_set={"train.epochs": 1})
    k = load(tmp_path, "name: v\nrows: [{id: a}]\n", extra_set={"train.epochs": 2})
    assert h["variant"].startswith("x") and h["variant"] != k["variant"]
    with pytest.raises(UserError, match="--tag 's1'"):
        load(tmp_path, "name: v\nrows: [{id: a}]\n", extra_set={"train.epochs": 1}, tag="s1")


@pytest.mark.slow
def test_end_to_end_queue_two_workers_and_report(mirror, tmp_path, exp_cache):
    """A four-row shrunk grid through a real DVC queue with two workers in a temporary clone:
    every run succeeds, each experiment holds its own numbers, the report has every row with
    numbers and marks the overlapped timing, and a second `queue` queues nothing."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", ROOT, str(repo)], check=True)
    warm_exp_cache(repo, exp_cache)
    env = dict(os.environ, DATA_MIRROR=mirror,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # two workers on two cores: one thread each (train.threads below), or a run holding every
    # core makes the other worker wait, and spinning OpenMP threads starve each other
    env["OMP_NUM_THREADS"] = "1"
    # 640 images, 40 steps, one thread: measured 60-78 % test accuracy at these rates on AVX-512
    # and 60-70 % on SSE4.1 kernels (200 images at lr 0.003 can end at 9.74 %: every image
    # called one class)
    lrs = {"a": 0.001, "b": 0.002, "c": 0.0005, "d": 0.0015}
    (repo / "grids" / "e2e.yaml").write_text(
        "name: e2e\ntargets: [train]\n"
        "set: {data.datasets: [mnist], data.train_limit: 640, data.test_limit: 1000, "
        "train.epochs: 1, train.device: cpu, train.threads: 1}\n"
        "columns:\n  - {label: lr, param: train.lr}\n"
        "  - {label: acc %, metric: test_accuracy, fmt: .2f}\n"
        "extra:\n  - {label: loss, metric: final_train_loss, fmt: .6f}\nrows:\n" + "".join(
            f"  - {{id: {k}, set: {{train.lr: {v}}}, study: {{acc %: 99.0}}}}\n"
            for k, v in lrs.items()))

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=repo, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert cli("ablation.grid", "queue", "grids/e2e.yaml").count("dvc exp run --queue") == 4
    # the shared upstream stage first: two workers that both produce data/prepared/mnist.npz
    # race in DVC's shared cache ("unable to remove ... without a confirmation")
    subprocess.run(["dvc", "remote", "modify", "--local", "storage", "url",
                    str(tmp_path / "storage")], cwd=repo, env=env, check=True)
    subprocess.run(["dvc", "repro", "prepare"], cwd=repo, env=env, check=True,
                   capture_output=True)
    start_queue(repo, env, 2)
    status = _wait_queue(repo, env)
    assert status.count("Success") == 4, status
    exps = D.newest(json.loads(subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
        check=True).stdout))
    losses, work = {}, {}
    for k, lr in lrs.items():
        e = exps[f"e2e-{k}"]
        assert e.params["train"]["lr"] == lr
        committed = json.loads(subprocess.run(
            ["git", "show", f"{e.rev}:metrics/resnet/mnist/resnet18.json"], cwd=repo,
            capture_output=True, text=True, check=True).stdout)
        shown = e.metrics["metrics/resnet/mnist/resnet18.json"]
        assert {k: v for k, v in committed.items() if v is not None} == shown  # DVC drops nulls
        losses[k] = committed["final_train_loss"]
        end = datetime.fromisoformat(e.timestamp).timestamp()  # its experiment commit
        work[k] = (end - (committed["train_time_ms"] + committed["eval_time_ms"]) / 1000, end)
    assert len(set(losses.values())) == 4, losses  # no experiment holds another's numbers
    cli("ablation.report", "grids/e2e.yaml")
    md = (repo / "reports" / "e2e.md").read_text()
    for k in lrs:
        cells = next(line for line in full_table(md).splitlines()
                     if line.startswith(f"| {k} |")).split(" | ")
        # learned: 3x chance, and a mean epoch loss well under an untrained model's ln 10 = 2.30
        assert cells[1].startswith("ok") and float(cells[3]) > 30.0, cells
        # "overlapped" exactly where the run's timed work overlapped another's (two workers)
        shared = any(work[k][0] < b and a < work[k][1] for j, (a, b) in work.items() if j != k)
        assert ("overlapped" in cells[1]) == shared, (cells[1], work)
        assert losses[k] < 0.8 * math.log(10), (k, losses[k])
        assert float(cells[6].strip("| ")) == pytest.approx(losses[k], abs=1e-6)
    assert (repo / "reports" / "e2e_curves.png").stat().st_size > 1000
    kept = json.loads((repo / "reports" / "e2e.json").read_text())["runs"]
    assert sorted(kept) == [f"e2e-{k}" for k in sorted(lrs)]  # each run's curve is kept
    assert all(list(e["data"]["curves"]["metrics/resnet/mnist/resnet18.json"]) == ["1"]
               for e in kept.values())
    again = cli("ablation.grid", "queue", "grids/e2e.yaml")
    assert "queued 0 experiment(s)" in again and again.count("skip e2e-") == 4


@pytest.mark.slow
def test_smoke_variant_then_real_run_then_changed_plan(mirror, tmp_path, exp_cache):
    """Through a real DVC queue: a --set smoke run is its own variant and does not block the
    real run; the real run is compared with the study; re-queueing skips it; editing the grid
    re-queues it and the report shows the new record."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", ROOT, str(repo)], check=True)
    warm_exp_cache(repo, exp_cache)
    env = dict(os.environ, DATA_MIRROR=mirror,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    grid = repo / "grids" / "sv.yaml"
    subprocess.run(["dvc", "remote", "modify", "--local", "storage", "url",
                    str(tmp_path / "storage")], cwd=repo, env=env, check=True)

    def write_grid(samples):
        grid.write_text(
            "name: sv\ntargets: [svm]\nset: {data.datasets: [mnist], svm.kernels: [rbf], "
            f"svm.backend: gram}}\ncolumns:\n  - {{label: n, param: svm.train_samples}}\n"
            "  - {label: acc %, metric: test_accuracy, fmt: .2f}\n"
            f"rows:\n  - {{id: a, set: {{svm.train_samples: {samples}}}, "
            f"study: {{acc %: 90.0}}}}\n")

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=repo, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def work_off():
        start_queue(repo, env, 1)
        status = _wait_queue(repo, env)
        assert "Failed" not in status, status

    def report_rows():
        cli("ablation.report", "grids/sv.yaml")
        return table_rows((repo / "reports" / "sv.md").read_text())

    write_grid(300)
    out = cli("ablation.grid", "queue", "grids/sv.yaml", "--set", "svm.train_samples=100",
              "--tag", "smoke")
    assert "-n sv-a-smoke " in out
    work_off()
    rows = report_rows()
    assert rows[("a", "not queued (1/1)")][2] == "300"
    smoke = rows[("a", "ok; smoke: train_samples 100")]
    assert smoke[2] == "100" and float(smoke[3]) > 50 and smoke[5] == "—"

    out = cli("ablation.grid", "queue", "grids/sv.yaml")  # the smoke run does not block it
    assert "-n sv-a " in out and "queued 1 experiment(s)" in out
    work_off()
    rows = report_rows()
    real = rows[("a", "ok")]
    assert real[2] == "300" and float(real[5]) == pytest.approx(float(real[3]) - 90.0, abs=0.01)
    assert ("a", "ok; smoke: train_samples 100") in rows

    assert "skip sv-a: already success" in cli("ablation.grid", "queue", "grids/sv.yaml")
    write_grid(200)
    out = cli("ablation.grid", "queue", "grids/sv.yaml")
    assert "re-run sv-a (plan changed since it ran: svm.train_samples 300 -> 200)" in out
    work_off()
    rows = report_rows()
    assert rows[("a", "ok")][2] == "200" and len(rows) == 2


def test_only_params_the_targets_read_count_as_differences(tmp_path):
    g = load(tmp_path, "name: s\ntargets: [svm]\nrows: [{id: a}]\n")
    plan = g["rows"][0]["params"]
    rec = json.loads(json.dumps(plan))
    rec["data"]["train_limit"], rec["train"]["lr"], rec["svm"]["seed"] = 300, 0.5, 7
    keys = G.relevant_keys(g)
    assert G.differences(rec, plan, keys) == {}  # train params and seeds do not matter
    rec["svm"]["C"] = 2.0
    del rec["svm"]["degree"]  # recorded before the key existed: not a difference
    assert G.differences(rec, plan, keys) == {"svm.C": 2.0}


def test_report_says_where_scheduled_runs_ran(tmp_path):
    g = load(tmp_path, "name: w\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                       "columns: [{label: acc, metric: test_accuracy}]\nrows: [{id: a}, {id: b}]\n")
    path = "metrics/resnet/mnist/resnet18.json"
    exps = {"w-a": fake_exp(g["rows"][0]["params"], {path: {
                "test_accuracy": 90.0, "host": "gpu1", "ray_node_id": "4ee6e18bc7018155",
                "cuda_visible_devices": "1"}}),
            "w-b": fake_exp(g["rows"][1]["params"], {path: {"test_accuracy": 91.0,
                                                            "host": "vm", "ray_node_id": None}})}
    md, _ = report.build(g, as_runs(exps))
    assert "- `w-a`: gpu1, node 4ee6e18b, GPUs 1" in md and "`w-b`:" not in md


def fig_grid(tmp_path):
    """Three rows, the study's accuracy and time for each: a ran with three seeds, b with one,
    c not at all."""
    rows = "".join(f"  - {{id: {r}, set: {{train.lr: {lr}}}, study: {{acc: {a}, time ms: {t}}}}}\n"
                   for r, lr, a, t in (("a", 0.001, 99.0, 600000), ("b", 0.0001, 98.0, 1200000),
                                       ("c", 0.0005, 97.0, 900000)))
    return load(tmp_path, "name: f\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
                          "columns:\n  - {label: lr, param: train.lr}\n"
                          "  - {label: epochs, param: train.epochs}\n"
                          "  - {label: acc, metric: test_accuracy}\n"
                          "  - {label: time ms, metric: train_time_ms}\nrows:\n" + rows)


FIG_RUNS = {"f-a-s0": ("a", 98.0, 20000), "f-a-s1": ("a", 99.0, 30000),
            "f-a-s2": ("a", 98.5, 40000), "f-b-s0": ("b", 90.0, 50000)}


def fig_runs(g, curves=None):
    """{name: Run} of FIG_RUNS; `curves`: {name: {epoch: acc}} their records keep."""
    path = "metrics/resnet/mnist/resnet18.json"
    rows = {r["id"]: r for r in g["rows"]}
    exps = {n: fake_exp(rows[rid]["params"], {path: {"test_accuracy": acc, "train_time_ms": t}})
            for n, (rid, acc, t) in FIG_RUNS.items()}
    for n, c in (curves or {}).items():
        exps[n]["data"]["curves"] = {path: {str(e): v for e, v in c.items()}}
    return as_runs(exps)


def fig_frame(g, curves=None):
    return report.build(g, fig_runs(g, curves))[1]


def points_of(ax):
    """(filled, hollow) point offsets of a figure's scatter collections."""
    from matplotlib.collections import PathCollection
    filled, hollow = [], []
    for c in ax.collections:
        if isinstance(c, PathCollection):
            alpha = c.get_facecolors()[:, 3] if len(c.get_facecolors()) else [0.0]
            (filled if max(alpha) > 0 else hollow).extend(map(tuple, c.get_offsets()))
    return sorted(filled), sorted(hollow)


def test_figure_acc_vs_time_ours_filled_study_hollow(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer
    g = fig_grid(tmp_path)
    fig = figures.scatter_figure(g, fig_frame(g), "train_time_ms")
    ax = fig.axes[0]
    fig.canvas.draw()
    filled, hollow = points_of(ax)
    assert filled == [pytest.approx((30.0, 98.5)), pytest.approx((50.0, 90.0))]  # mean, in s
    assert hollow == [pytest.approx((600.0, 99.0)), pytest.approx((900.0, 97.0)),
                      pytest.approx((1200.0, 98.0))]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and bars[0].has_xerr and bars[0].has_yerr  # only row a has n > 1
    xseg = bars[0].lines[2][0].get_segments()[0]  # std over seeds: 10 s, 0.5 points
    assert xseg[:, 0] == pytest.approx([20.0, 40.0]) and xseg[:, 1] == pytest.approx(98.5)
    joins = [ln.get_xydata().tolist() for ln in ax.lines if ln.get_linestyle() == "-"]
    assert joins == [[[30.0, 98.5], [600.0, 99.0]], [[50.0, 90.0], [1200.0, 98.0]]]
    texts = [t.get_text() for t in ax.texts]
    assert sorted(texts) == ["ResNet-18 lr1e-3", "ResNet-18 lr1e-4",
                             "ResNet-18 lr5e-4 (not run)"]  # epochs is the same everywhere
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "filled: ours, n=1-3 seed(s) per row: mean, bars ±1 std"
    assert legend[1].startswith("hollow: the study")
    assert ax.get_xscale() == "log"
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks and all(ticks) and "1 min" in ticks and "10 min" in ticks
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.texts]
    assert not any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1:])
    plt.close(fig)


def test_figure_labels_name_dataset_and_kernel_from_the_grid(tmp_path):
    """Table 2's grid: labels built from its param columns; the constant one (samples) left
    out."""
    import matplotlib.pyplot as plt
    g = G.load(os.path.join(ROOT, "grids", "table2.yaml"), params_path=PARAMS)
    exps = {}
    for k, r in enumerate(g["rows"]):
        ds, kern = r["params"]["data"]["datasets"][0], r["params"]["svm"]["kernels"][0]
        exps[f"table2-{r['id']}"] = fake_exp(r["params"], {f"metrics/svm/{ds}/{kern}.json": {
            "test_accuracy": 90.0 + k, "train_time_ms": 3000.0 + 500 * k}})
    fig = figures.scatter_figure(g, report.build(g, as_runs(exps))[1], "train_time_ms")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert sorted(t.get_text() for t in ax.texts) == [
        "Fashion-MNIST RBF", "Fashion-MNIST poly", "MNIST RBF", "MNIST poly"]
    assert [len(p) for p in points_of(ax)] == [4, 4]
    assert not [c for c in ax.containers]  # one seed each: no error bars
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ticks) >= 3 and all(t.endswith(" s") for t in ticks)
    plt.close(fig)


@pytest.mark.parametrize("epochs", [1, 3])
def test_figure_curves_integer_epochs(tmp_path, epochs):
    """The curves each run's record keeps (dvclive's TSV as store.parse_curve reads it)."""
    import matplotlib.pyplot as plt
    g = fig_grid(tmp_path)
    tsv = {n: "step\taccuracy\n" + "".join(f"{e}\t{acc - 2 * (epochs - 1 - e)}\n"
                                           for e in range(epochs))
           for n, acc in zip(FIG_RUNS, [98.0, 99.0, 98.5, 90.0])}
    curves = {n: store.parse_curve(text) for n, text in tsv.items()}
    assert all(list(c) == list(range(1, epochs + 1)) for c in curves.values())
    frame = fig_frame(g, curves)
    fig = figures.curves_figure(g, frame)
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ResNet-18 lr1e-3 (n=3)", "ResNet-18 lr1e-4 (n=1)"]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [str(e) for e in range(1, epochs + 1)]
    lo, hi = ax.get_ylim()
    assert lo < 90.0 and hi > 99.0 and hi - lo < 20
    if epochs == 1:  # markers, no line; row a's bar is the std over its three seeds
        assert all(ln.get_linestyle() == "None" for ln in ax.lines if len(ln.get_xdata()) == 1)
        assert len(ax.containers) == 2 and ax.containers[0].has_yerr
    else:
        curves = [ln for ln in ax.lines if len(ln.get_xdata()) == 3]
        assert [list(ln.get_xdata()) for ln in curves] == [[1, 2, 3]] * 2
        assert list(curves[0].get_ydata()) == pytest.approx([94.5, 96.5, 98.5])
    plt.close(fig)


def test_figures_written_only_with_runs(tmp_path):
    g = fig_grid(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert figures.figures(g, report.build(g, {})[1], str(out)) == []  # study alone: no figure
    assert figures.figures(g, fig_frame(g), str(out)) == ["f_acc_vs_time.png"]
    assert (out / "f_acc_vs_time.png").stat().st_size > 10000


def git_repo(path):
    """A git repository at `path`; returns its `git` (output stripped)."""
    def git(*a):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a],
                              cwd=path, check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    return git


def test_attach_records_reads_each_runs_record_at_its_commit(tmp_path):
    """One `git cat-file --batch` for all runs: a record found is merged under its metrics
    (the metrics file's own keys win), a missing or malformed one is left out; runs that did
    not finish get none; the runs given are left as they were (a new dict comes back)."""
    git = git_repo(tmp_path)
    m = tmp_path / "metrics" / "resnet" / "mnist"
    m.mkdir(parents=True)
    (m / "resnet18.run.json").write_text('{"host": "a", "device": "cpu", "loader": "x"}')
    (m / "resnet50.run.json").write_text('{"host": ')  # malformed
    git("add", "-A")
    git("commit", "-qm", "records")
    rev = git("rev-parse", "HEAD")

    def run(name, files, state="success"):
        return Run(name, state, rev=rev, metrics={p: dict(v) for p, v in files.items()})
    runs = {"one": run("one", {
        "metrics/resnet/mnist/resnet18.json": {"test_accuracy": 99.0, "loader": "kept"},
        "metrics/resnet/mnist/resnet50.json": {"test_accuracy": 98.0},
        "metrics/resnet/mnist/resnet34.json": {"test_accuracy": 97.0}}),  # no record
        "unfinished": Run("unfinished", "queued"),
        "failed": run("failed", {"metrics/resnet/mnist/resnet18.json": {}}, "failed")}
    before = copy.deepcopy(runs)
    out = D.attach_records(runs, cwd=tmp_path)
    assert runs == before and out is not runs
    got = out["one"].metrics
    assert got["metrics/resnet/mnist/resnet18.json"] == {
        "test_accuracy": 99.0, "loader": "kept", "host": "a", "device": "cpu"}
    assert got["metrics/resnet/mnist/resnet50.json"] == {"test_accuracy": 98.0}
    assert got["metrics/resnet/mnist/resnet34.json"] == {"test_accuracy": 97.0}
    assert out["unfinished"] == runs["unfinished"] and out["failed"] == runs["failed"]


def test_report_keeps_its_records_and_rebuilds_from_them(tmp_path):
    """The report writes reports/<grid>.json: each finished run's recorded params and metrics.
    With the experiments gone (another clone, a reclaimed machine) it rebuilds the same table
    from that file; a new run joins the recorded ones; a damaged file is one clear error."""
    text = ("name: k\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
            "columns: [{label: acc, metric: test_accuracy, fmt: .2f}]\n"
            "rows: [{id: a}, {id: b}]\n")
    (tmp_path / "g.yaml").write_text(text)
    g = load(tmp_path, text)
    a = g["rows"][0]["params"]
    exps = {f"k-a-s{s}": fake_exp(a, {"metrics/resnet/mnist/resnet18.json": {
        "test_accuracy": 90.0 + s}}) for s in (0, 1)}
    out = tmp_path / "reports"
    command.main(str(tmp_path / "g.yaml"), str(out), runs=as_runs(exps))
    first = (out / "k.md").read_text()
    rec = json.loads((out / "k.json").read_text())
    assert sorted(rec["runs"]) == ["k-a-s0", "k-a-s1"]
    assert "90.50 [84.15 – 96.85]" in first
    command.main(str(tmp_path / "g.yaml"), str(out), runs={})  # no experiments here any more
    assert (out / "k.md").read_text() == first
    b = g["rows"][1]["params"]
    command.main(str(tmp_path / "g.yaml"), str(out), runs=as_runs({"k-b-s0": fake_exp(b, {
        "metrics/resnet/mnist/resnet18.json": {"test_accuracy": 80.0}}),
        "k-b-s1": fake_exp(b, {}, state="queued")}))  # unfinished: shown, not kept
    assert "90.50 [84.15 – 96.85]" in (out / "k.md").read_text()
    assert sorted(json.loads((out / "k.json").read_text())["runs"]) == [
        "k-a-s0", "k-a-s1", "k-b-s0"]
    (out / "k.json").write_text('{"runs": {"k-a-s0": {"state": "success"}}}')
    with pytest.raises(UserError, match=r"k.json: not a report's run record: run 'k-a-s0'"):
        command.main(str(tmp_path / "g.yaml"), str(out), runs={})


def test_record_keeps_curves_and_the_report_rebuilds_them_from_it_alone(tmp_path, monkeypatch):
    """Each train run's per-epoch curve goes into the record: a DVC run's read once from its
    experiment commit (dvclive's TSV), a run that brought its own (Run.curves, a GPU archive's)
    as it is. On a clone that has neither the experiments nor their commits, `python -m
    ablation.report` rebuilds the same report from the record alone, the curves figure
    included, and writes the same record again."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PARAMS, repo / "params.yaml")
    monkeypatch.chdir(repo)
    git = git_repo(repo)
    g = fig_grid(tmp_path)
    path = "metrics/resnet/mnist/resnet18.json"
    curves = {n: {1: acc - 1.5, 2: acc - 0.5, 3: acc} for n, (_, acc, _) in FIG_RUNS.items()}
    tsv = repo / "metrics" / "resnet" / "mnist" / "resnet18" / "plots" / "metrics" / "test"
    tsv.mkdir(parents=True)
    revs = {}
    for n in ("f-a-s0", "f-b-s0"):  # DVC runs: their curve is in their commit only
        (tsv / "accuracy.tsv").write_text("step\taccuracy\n" + "".join(
            f"{e - 1}\t{v}\n" for e, v in curves[n].items()))
        git("add", "-A")
        git("commit", "-qm", n)
        revs[n] = git("rev-parse", "HEAD")
    runs = {n: dataclasses.replace(r, rev=revs.get(n)) for n, r in fig_runs(
        g, {n: c for n, c in curves.items() if n not in revs}).items()}
    assert [n for n, r in runs.items() if r.curves] == ["f-a-s1", "f-a-s2"]
    out = tmp_path / "reports"
    command.main(str(tmp_path / "g.yaml"), str(out), runs=runs)
    first = (out / "f.md").read_text()
    assert "![f_curves.png](f_curves.png)" in first
    kept = json.loads((out / "f.json").read_text())
    assert {n: e["data"]["curves"][path] for n, e in kept["runs"].items()} == {
        n: {str(k): v for k, v in c.items()} for n, c in curves.items()}
    assert {n: r.curves for n, r in store.load(str(out / "f.json")).items()} == {
        n: {path: c} for n, c in curves.items()}

    clone = tmp_path / "clone"  # a clone: the grid, params and the record; no experiments
    (clone / "grids").mkdir(parents=True)
    (clone / "reports").mkdir()
    shutil.copy(PARAMS, clone / "params.yaml")
    shutil.copy(tmp_path / "g.yaml", clone / "grids" / "f.yaml")
    shutil.copy(out / "f.json", clone / "reports" / "f.json")
    cgit = git_repo(clone)
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(["dvc", "init", "-q"], cwd=clone, env=env, check=True)
    cgit("add", "-A")
    cgit("commit", "-qm", "clone")
    r = subprocess.run([sys.executable, "-m", "ablation.report", "grids/f.yaml"], cwd=clone,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "(4 finished runs, 4 of them read from it)" in r.stdout
    assert (clone / "reports" / "f.md").read_text() == first
    assert (clone / "reports" / "f_curves.png").stat().st_size > 10000
    assert json.loads((clone / "reports" / "f.json").read_text()) == kept


def table_lines(text):
    """The lines of a report's Markdown table."""
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("name", ["baseline", "table2", "table3"])
def test_committed_reports_rebuild_from_their_records(tmp_path, monkeypatch, name):
    """reports/<grid>.md is what the committed record reports/<grid>.json gives, with the
    repository's params.yaml and grid and no live experiment: `report --out DIR` starts from
    that record and writes the same table, line for line, and the same record to DIR."""
    monkeypatch.chdir(ROOT)
    committed = os.path.join(ROOT, "reports", f"{name}.json")
    out = tmp_path / "elsewhere"  # --out DIR without a record: the committed one is read
    command.main(os.path.join("grids", f"{name}.yaml"), str(out), runs={})
    with open(os.path.join(ROOT, "reports", f"{name}.md")) as f:
        assert table_lines((out / f"{name}.md").read_text()) == table_lines(f.read())
    with open(committed) as f:
        assert json.loads((out / f"{name}.json").read_text()) == json.load(f)


def test_plan_only_leaves_out_variants(tmp_path):
    """`report --plan-only`: the rows as planned, without smoke (`--set`) variants."""
    g = load(tmp_path, "name: t\nrows: [{id: a}, {id: b}]\n")
    runs = {n: Run(n, "success") for n in ("t-a", "t-a-s1", "t-b-smoke", "t-b-smoke-s0", "t-c",
                                           "other")}
    assert sorted(command.select(g, runs, plan_only=True, keep=())) == ["t-a", "t-a-s1"]
    assert sorted(command.select(g, runs, plan_only=False, keep=["smoke"])) == [
        "t-a", "t-a-s1", "t-b-smoke", "t-b-smoke-s0"]
    assert command.select(g, runs, plan_only=False, keep=()) == runs  # no filter: every run


def test_with_variants_keeps_a_controlled_run_on_its_own_line(tmp_path):
    """`report --with-variants nomom`: the rows as planned plus that variant's runs, on a line
    that names what differs, kept in the record; other variants left out; a name that cannot be
    a variant, or one no run has, is refused before anything is written."""
    text = ("name: k\ntargets: [train]\nset: {data.datasets: [mnist]}\n"
            "columns: [{label: acc, metric: test_accuracy, fmt: .2f}]\nrows: [{id: a}]\n")
    (tmp_path / "g.yaml").write_text(text)
    plan = load(tmp_path, text)["rows"][0]["params"]
    nomom, smoke = copy.deepcopy(plan), copy.deepcopy(plan)
    nomom["train"]["momentum"] = 0.0
    smoke["train"]["epochs"] = 1

    def acc(v):
        return {"metrics/resnet/mnist/resnet18.json": {"test_accuracy": v}}
    runs = as_runs({"k-a-s0": fake_exp(plan, acc(90.0)),
                    "k-a-nomom-s0": fake_exp(nomom, acc(85.0)),
                    "k-a-smoke-s0": fake_exp(smoke, acc(70.0))})
    out = tmp_path / "r"
    with pytest.raises(UserError, match=r"--with-variants 'no-mom': not a variant name"):
        command.main(str(tmp_path / "g.yaml"), str(out), runs=runs, keep=["no-mom"])
    with pytest.raises(UserError, match=r"--with-variants 'nomomentum': no run of the grid has "
                                        r"that variant \(variants with runs: nomom, smoke\)"):
        command.main(str(tmp_path / "g.yaml"), str(out), runs=runs, keep=["nomomentum"])
    assert not out.exists()
    command.main(str(tmp_path / "g.yaml"), str(out), runs=runs, keep=["nomom"])
    md = (out / "k.md").read_text()
    assert "| a | ok; nomom: momentum 0.0 | 85.00 |" in md and "70.00" not in md
    assert "85.00" in md and "90.00" in md
    assert sorted(json.loads((out / "k.json").read_text())["runs"]) == ["k-a-nomom-s0", "k-a-s0"]
