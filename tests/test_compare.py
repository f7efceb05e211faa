"""`python -m ablation.report.compare`: the pull-request comment, on a real temporary git + DVC repo
with two commits of small metrics, params and dvclive files and two real DVC experiments (a
one-line stage writes the SVM metrics from svm.C); nothing is trained. Also lints the workflow
that posts the comment."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the project's venv: dvc, and python for the stage
ENV = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], DVC_NO_ANALYTICS="1")
MNIST, FASHION = "metrics/resnet/mnist/resnet18", "metrics/resnet/fashion_mnist/resnet18"
STUB = """import json, os, yaml
C = yaml.safe_load(open("params.yaml"))["svm"]["C"]
os.makedirs("metrics/svm/mnist", exist_ok=True)
with open("metrics/svm/mnist/rbf.json", "w") as f:
    json.dump({"test_accuracy": 90.0 + C, "train_time_ms": 1000.0 * C + 500.0}, f)
"""
DVC_YAML = """stages:
  train:
    cmd: "true"
    params: [train.lr, train.seed]
  svm:
    cmd: python svm_stub.py
    deps: [svm_stub.py, src/lib.py]
    params: [svm.C]
    metrics:
      - metrics/svm/mnist/rbf.json: {cache: false}
metrics:
"""


def sh(cwd, *cmd):
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


EPYC = {"device_name": "AMD EPYC (2 cores)", "cpu_isa": "AVX512", "threads": 2}
# the seeds of the MNIST run's configuration, as a grid report keeps them (test accuracy %,
# train time ms): main's params but for the seed, on main's machine
SEEDS = [(99.30, 955000.0), (99.36, 960000.0), (99.42, 965000.0)]


def write_run(repo, stem, metrics, acc, machine=EPYC):
    """A ResNet run's metrics JSON, its run record and dvclive's per-epoch test accuracy
    (header as dvclive's)."""
    os.makedirs(repo / stem / "plots" / "metrics" / "test", exist_ok=True)
    (repo / f"{stem}.json").write_text(json.dumps(metrics))  # NaN stays NaN, as json.dump writes
    (repo / f"{stem}.run.json").write_text(json.dumps(machine))
    (repo / stem / "plots" / "metrics" / "test" / "accuracy.tsv").write_text(
        "step\taccuracy\n" + "".join(f"{i}\t{a}\n" for i, a in enumerate(acc)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """main: ResNet MNIST run + SVM stage; experiments off main; branch pr: lr halved, new
    MNIST numbers and curve, a Fashion-MNIST run that main lacks (images_per_s NaN); branch
    avx2: pr run again on another machine; branch rerun: main's MNIST run again on its
    machine, within its seeds' spread."""
    repo = tmp_path_factory.mktemp("compare") / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    shutil.copy(os.path.join(ROOT, "params.yaml"), repo / "params.yaml")
    shutil.copytree(os.path.join(ROOT, "grids"), repo / "grids")
    (repo / "svm_stub.py").write_text(STUB)
    (repo / "src").mkdir()
    (repo / "src" / "lib.py").write_text("SCALE = 1\n")
    (repo / "dvc.yaml").write_text(DVC_YAML + f"  - {MNIST}.json\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    runs = {}
    for seed, (acc, ms) in enumerate(SEEDS):
        p = json.loads(json.dumps(params))
        p["train"]["seed"] = seed
        runs[f"baseline-mnist-s{seed}"] = {"state": "success", "data": {
            "params": {"params.yaml": {"data": p}},
            "metrics": {f"{MNIST}.json": {"data": {"test_accuracy": acc, "train_time_ms": ms,
                                                   **EPYC}}}}}
    (repo / "reports").mkdir()
    (repo / "reports" / "baseline.json").write_text(json.dumps({"grid": "baseline",
                                                                "runs": runs}))
    write_run(repo, MNIST, {"test_accuracy": 99.33, "train_time_ms": 960504.6,
                            "images_per_s": 312.34, "data_wait_ms": 5058.77},
              [96.44, 98.30, 98.91, 99.25, 99.33])
    sh(repo, "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    row = ["-S", "data.datasets=[mnist]", "-S", "svm.kernels=[rbf]"]  # table2's mnist_rbf
    for name, extra in (("table2-mnist_rbf-s0", ["-S", "svm.C=2.0"]), ("probe", [])):
        sh(repo, "dvc", "exp", "run", "-q", "-n", name, *row, *extra)
        sh(repo, "git", "reset", "-q", "--hard")  # exp run leaves its results in the workspace
    sh(repo, "git", "checkout", "-q", "-b", "pr")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace(
        "lr: 0.001", "lr: 0.0005", 1))
    (repo / "dvc.yaml").write_text(DVC_YAML + f"  - {MNIST}.json\n  - {FASHION}.json\n")
    write_run(repo, MNIST, {"test_accuracy": 99.40, "train_time_ms": 900000.0,
                            "images_per_s": 333.33, "data_wait_ms": 9000.0},
              [97.1, 98.6, 99.0, 99.3, 99.4])
    write_run(repo, FASHION, {"test_accuracy": 88.35, "train_time_ms": 897000.0,
                              "images_per_s": float("nan"), "data_wait_ms": None},
              [84.0, 86.5, 87.6, 88.0, 88.35])
    (repo / "src" / "lib.py").write_text("SCALE = 2\n")  # code the svm stage depends on
    (repo / "src" / "tool.py").write_text("print('no stage runs me')\n")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lr 0.0005")
    sh(repo, "git", "checkout", "-q", "-b", "avx2")  # pr's runs again on another machine
    write_run(repo, MNIST, {"test_accuracy": 99.40, "train_time_ms": 1260000.0,
                            "images_per_s": 238.1, "data_wait_ms": 9000.0},
              [97.1, 98.6, 99.0, 99.3, 99.4],
              {"device_name": "Intel(R) Xeon(R) (2 cores)", "cpu_isa": "AVX2", "threads": 2})
    sh(repo, "git", "commit", "-qam", "pr on an AVX2 machine")
    sh(repo, "git", "checkout", "-q", "-b", "rerun", "main")
    write_run(repo, MNIST, {"test_accuracy": 99.38, "train_time_ms": 957000.0,
                            "images_per_s": 313.5, "data_wait_ms": 5100.0},
              [96.5, 98.2, 98.9, 99.3, 99.38])
    sh(repo, "git", "commit", "-qam", "main's run again")
    for branch, layers in (("paths-a", ["layer3.0.conv1", "layer4.1.conv2"]),
                           ("paths-b", ["layer4.0.conv1", "layer4.1.conv2"])):
        sh(repo, "git", "checkout", "-q", "-b", branch)  # a off rerun, b off a
        write_run(repo, MNIST, {"test_accuracy": 99.38, "train_time_ms": 957000.0,
                                "images_per_s": 313.5, "data_wait_ms": 5100.0},
                  [96.5, 98.2, 98.9, 99.3, 99.38],
                  {**EPYC, "small_map_paths": {"matmul": layers, "conv": ["layer1.0.conv1"]}})
        sh(repo, "git", "commit", "-qam", f"kernel paths {branch}")
    sh(repo, "git", "checkout", "-q", "-b", "busy", "main")  # main's run beside a test suite
    write_run(repo, MNIST, {"test_accuracy": 99.38, "train_time_ms": 1500000.0,
                            "images_per_s": 200.0, "data_wait_ms": 5100.0},
              [96.5, 98.2, 98.9, 99.3, 99.38], {**EPYC, "other_load_cores": 0.9})
    sh(repo, "git", "commit", "-qam", "main's run again, on a busy machine")
    sh(repo, "git", "checkout", "-q", "pr")
    return repo


def compare(repo, *args):
    return subprocess.run([sys.executable, "-m", "ablation.report.compare", *args], cwd=repo,
                          env=ENV, capture_output=True, text=True)


def row(md, file, metric):
    """The cells of one line of the metrics table: `metric` in the block of `file`."""
    block = None
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0]:
            block = file in cells[0]
        if block and len(cells) > 2 and cells[1] == metric:
            return cells
    raise AssertionError(f"no row {metric!r} of {file} in:\n{md}")


def t_p(diff, sd, n):
    """Two-sided p of one run against one run, seed sd over n seeds (scipy, by hand)."""
    from scipy import stats
    return 2 * stats.t.sf(abs(diff) / (sd * 2 ** 0.5), n - 1)


def test_pull_request_comment(repo):
    r = compare(repo, "main", "pr", "--out", "out/compare.md")
    assert r.returncode == 0, r.stderr
    md = (repo / "out" / "compare.md").read_text()
    assert r.stdout == md
    assert sorted(os.listdir(repo / "out")) == ["compare.md", "compare.png"]  # no temp files
    # against the three recorded seeds of main's configuration: accuracy sd 0.06, time sd 5000
    p_acc, p_time = t_p(99.40 - 99.33, 0.06, 3), t_p(900000.0 - 960504.6, 5000.0, 3)
    assert p_acc > 0.05 > p_time
    # first the verdict, from the table's own cells (below); then, one machine, what changed
    assert md.startswith(
        f"## Results: `main` → `pr`\n\n**Verdict: train time ms of `{MNIST}.json` (-6.3 %, "
        f"p {p_time:.2g}) moved beyond seed noise** (2 metrics judged; 3 metrics not judged: "
        f"no seeds on record; 1 timing not judged: machine not on record)\n\n"
        f"### What changed\n")
    assert "- **Code changed**: `src/lib.py` (stages: `svm`); `src/tool.py` (no stage). " \
           "Stages whose code changed: `svm`: their results may move with it." in md
    assert "- **Params**: 1 changed" in md and "No params changed" not in md
    assert "| `params.yaml` `train.lr` | 0.001 | 0.0005 |" in md
    assert "train.epochs" not in md  # only changed params
    assert row(md, MNIST, "test accuracy %")[2:5] == ["99.33", "99.40", "+0.07"]
    assert row(md, MNIST, "train time ms")[2:5] == ["960,505", "900,000", "-6.3 %"]
    assert row(md, MNIST, "images/s")[2:5] == ["312.3", "333.3", "+6.7 %"]
    # data wait share: 5058.77 / 960504.6 = 0.53 %, 9000 / 900000 = 1.00 %
    assert row(md, MNIST, "data wait % of train time")[2:5] == ["0.53", "1.00", "+0.47 pp"]
    assert row(md, MNIST, "test accuracy %")[5] == \
        f"within noise (seed sd 0.06, n=3, p {p_acc:.2g})"
    assert row(md, MNIST, "train time ms")[5] == \
        f"beyond noise (seed sd 5e+03, n=3, p {p_time:.2g})"
    assert row(md, MNIST, "images/s")[5] == "no seeds on record"  # the seeds recorded none
    assert f"| `{FASHION}.json` (new) | test accuracy % | — | 88.35 | new |  |" in md
    assert row(md, FASHION, "images/s")[2:5] == ["—", "NaN", "new"]  # NaN shown as NaN
    assert row(md, FASHION, "data wait % of train time")[2:5] == ["—", "—", "new"]  # null
    svm = row(md, "metrics/svm/mnist/rbf.json", "test accuracy %")
    assert svm[2:] == ["91.00", "91.00", "+0.00", "no seeds on record"]  # unchanged: listed
    assert "study" not in md and "inherited" not in md  # pr runs no grid row; a commit
    back = compare(repo, "pr", "main").stdout
    assert f"| `{FASHION}.json` (removed) | test accuracy % | 88.35 | — | removed |  |" in back
    assert "![Per-epoch test accuracy, main vs pr](compare.png)" in md
    png = (repo / "out" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    import matplotlib.image
    img = matplotlib.image.imread(str(repo / "out" / "compare.png"))
    assert img.shape[1] > img.shape[0] > 300  # two panels side by side


def test_another_machine_is_said_first_and_its_timings_not_compared(repo):
    """The same code and params run again on an AVX2 machine: the comment says the machines
    differ right after its verdict (which judged nothing), marks every timing change not
    comparable, and still judges accuracy against seed noise."""
    r = compare(repo, "pr", "avx2")
    assert r.returncode == 0, r.stderr
    md = r.stdout
    verdict, first = md.split("\n\n")[1:3]
    # nothing judged: accuracy has no seeds of lr 0.0005, timings are another machine's
    assert verdict == ("**Verdict: no change judged against seed noise** (4 metrics not "
                       "judged: no seeds on record; 3 timings not comparable: machines differ; "
                       "1 timing not judged: machine not on record)")
    assert first.startswith("**The two sides ran on different machines** (`pr` on `AMD EPYC "
                            "(2 cores), AVX512, 2 threads`, `avx2` on `Intel(R) Xeon(R) (2 "
                            "cores), AVX2, 2 threads`)"), first
    assert "- **Params**: none changed" in md and "Code changed" not in md
    for metric in ("train time ms", "images/s", "data wait % of train time"):
        assert row(md, MNIST, metric)[5] == "not comparable: machines differ", metric
    assert row(md, MNIST, "train time ms")[2:5] == ["900,000", "1,260,000", "+40.0 %"]
    # the seeds on record ran lr 0.001; both sides run 0.0005: none of their configuration
    assert row(md, MNIST, "test accuracy %")[5] == "no seeds on record"
    same = compare(repo, "main", "pr").stdout  # one machine: no such paragraph
    assert "different machines" not in same and "not comparable" not in same


def test_other_kernel_paths_are_said_after_the_verdict(repo):
    """One machine, one code, two VMs' small-map choices (`auto` times them): the comment says
    which layers took the other path, and that accuracy moves with them like a seed; where
    one side's record names no paths (main's), it says nothing."""
    md = compare(repo, "paths-a", "paths-b").stdout
    first = md.split("\n\n")[2]
    assert first.startswith("**The two sides' small-map kernel paths differ** (`metrics/resnet"
                            "/mnist/resnet18.json`: `layer3.0.conv1` on the matmul path in "
                            "`paths-a` only, `layer4.0.conv1` on the matmul path in `paths-b` "
                            "only): `train.small_maps: auto` chose them by timing"), first
    assert "different machines" not in md
    assert "kernel paths differ" not in compare(repo, "main", "paths-b").stdout


def test_a_timing_from_a_busy_machine_is_not_judged(repo):
    """The target's record says other processes kept 0.9 cores busy while it was timed: its
    timings are not judged (the verdict line says so), its accuracy is."""
    md = compare(repo, "main", "busy").stdout
    for metric in ("train time ms", "images/s"):
        assert row(md, MNIST, metric)[5] == "machine busy: timing not judged", metric
    assert row(md, MNIST, "test accuracy %")[5].startswith("within noise (seed sd ")
    assert "not judged: machine busy" in md.split("\n\n")[1]


def test_a_rerun_within_the_seeds_spread_is_no_change(repo):
    """main's run again on its machine, accuracy and time inside the spread of main's seeds:
    the verdict says no change beyond noise, with what it judged and what it could not."""
    r = compare(repo, "main", "rerun")
    assert r.returncode == 0, r.stderr
    md = r.stdout
    p_acc, p_time = t_p(99.38 - 99.33, 0.06, 3), t_p(957000.0 - 960504.6, 5000.0, 3)
    assert min(p_acc, p_time) > 0.05
    assert row(md, MNIST, "test accuracy %")[4:] == [
        "+0.05", f"within noise (seed sd 0.06, n=3, p {p_acc:.2g})"]
    assert row(md, MNIST, "train time ms")[4:] == [
        "-0.4 %", f"within noise (seed sd 5e+03, n=3, p {p_time:.2g})"]
    assert md.startswith(
        "## Results: `main` → `rerun`\n\n**Verdict: no change beyond seed noise** (2 metrics "
        "judged; 3 metrics not judged: no seeds on record; 1 timing not judged: machine not on "
        "record)\n\n### What changed\n")


def test_verdict_names_three_changes_then_counts():
    """Five files' accuracy beyond the noise of SEEDS: the verdict names the first three, in
    the table's order, and counts the rest."""
    from ablation.report.compare import Judged, Judgement, verdict
    from ablation.report.stats import change_against_noise
    judged = []
    for i in range(5):
        n = change_against_noise([acc for acc, _ in SEEDS], 99.36, 98.0 - i / 10)
        judged.append(Judged(f"m{i}.json", "test accuracy %", f"{n.diff:+.2f}",
                             Judgement(n.verdict, n.diff, n.p, None, n.base.sd, n.base.n)))
    p = [t_p(98.0 - i / 10 - 99.36, 0.06, 3) for i in range(3)]
    assert max(p) < 0.05
    assert verdict(judged) == (
        f"**Verdict: test accuracy % of `m0.json` (-1.36, p {p[0]:.2g}), test accuracy % of "
        f"`m1.json` (-1.46, p {p[1]:.2g}), test accuracy % of `m2.json` (-1.56, p {p[2]:.2g}) "
        f"and 2 more moved beyond seed noise** (5 metrics judged)")
    assert verdict([]).startswith("**Verdict: no change to judge against seed noise**")


def test_experiment_beside_the_study(repo):
    r = compare(repo, "main", "table2-mnist_rbf-s0")
    assert r.returncode == 0, r.stderr
    md = r.stdout
    assert "| `params.yaml` `svm.C` | 1.0 | 2.0 |" in md
    assert ("Study figures: `grids/table2.yaml`, row `mnist_rbf` (by experiment name; its "
            "params differ from the row's plan: svm.C 2.0).") in md
    svm = "metrics/svm/mnist/rbf.json"
    assert row(md, svm, "test accuracy %")[2:] == ["91.00", "92.00", "+1.00",
                                                   "no seeds on record", "95.94"]
    assert row(md, svm, "train time ms")[2:] == [  # the stub writes no run record
        "1,500", "2,500", "+66.7 %", "machine not on record: timing not judged", "7,151"]
    # the experiment ran the svm stage only: the ResNet file is its parent's, not its result
    assert row(md, MNIST, "test accuracy %")[:6] == [f"`{MNIST}.json` (inherited)",
                                                     "test accuracy %", "99.33", "—",
                                                     "inherited", ""]
    assert "`inherited`: a run `table2-mnist_rbf-s0` did not produce" in md
    assert "Per-epoch" not in md  # no --out, no --plot: no PNG
    probe = compare(repo, "main", "probe").stdout  # no grid name, but the row's params
    assert "row `mnist_rbf` (its params are the row's)" in probe
    assert row(probe, svm, "test accuracy %")[2:5] == ["91.00", "91.00", "+0.00"]
    assert row(probe, svm, "test accuracy %")[6] == "95.94"


def test_compare_and_show_import_no_torch():
    """What a pull request's comparison runs reads records only: importing it loads no torch
    (the workflow's environment has none)."""
    code = ("import sys, ablation.report.compare, ablation.report.show, "
            "ablation.report.changes, ablation.report.stats, ablation.report.format; "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray', 'sklearn', 'dvclive') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_seeds_are_the_configurations_own():
    """The seed record a change is judged against: runs that differ from the side's params in
    the seed only (keys either side lacks count as equal), of a grid whose stages produced the
    file, and for timings only runs of the same machine."""
    from ablation.record.run import Run
    from ablation.report import changes
    path, other = f"{MNIST}.json", {"device_name": "Intel(R) Xeon(R) (2 cores)",
                                    "cpu_isa": "AVX2", "threads": 2}

    def run(name, lr, seed, acc, machine=EPYC, **extra):
        params = {"train": {"lr": lr, "seed": seed, **extra}}
        return Run.from_dict(name, {"state": "success", "data": {
            "params": {"params.yaml": {"data": params}},
            "metrics": {path: {"data": {"test_accuracy": acc, "train_time_ms": acc * 1e4,
                                        **machine}}}}})
    runs = [(run("a", 0.001, 0, 99.1), ["train"]), (run("b", 0.001, 1, 99.2), ["train"]),
            (run("c", 0.002, 0, 98.0), ["train"]),  # another lr
            (run("d", 0.001, 2, 99.3, other), ["train"]),  # another machine
            (run("e", 0.001, 0, 50.0), ["svm"]),  # a grid of svm runs: the file is inherited
            (run("f", 0.001, 3, 99.4, epochs=7), None),  # a key the side does not name
            (run("g", 0.001, 0, 99.1), ["train"])]  # seed 0 again (run cache): one run
    keys = ["train.lr", "train.seed", "train.epochs"]
    side = {"train": {"lr": 0.001, "seed": 9}}
    assert changes.seeds_of(runs, path, "test_accuracy", side, keys) == [99.1, 99.2, 99.3, 99.4]
    assert changes.seeds_of(runs, path, "train_time_ms", side, keys,
                            changes.machine(EPYC)) == pytest.approx([991e3, 992e3, 994e3])
    assert changes.seeds_of(runs, path, "test_accuracy", {"train": {"lr": 0.002}}, keys) == \
        [98.0]
    assert changes.seeds_of(runs, path, "test_accuracy", side, []) is None  # stage unknown
    assert changes.seeds_of(runs, path, "test_accuracy", {}, keys) is None  # params unknown
    # a seed whose record says other processes kept 0.9 cores busy: no timing, its accuracy kept
    runs.append((run("h", 0.001, 4, 99.5, {**EPYC, "other_load_cores": 0.9}), ["train"]))
    runs.append((run("i", 0.001, 5, 99.6, {**EPYC, "other_load_cores": 0.02}), ["train"]))
    assert changes.seeds_of(runs, path, "train_time_ms", side, keys, changes.machine(EPYC),
                            timing=True) == pytest.approx([991e3, 992e3, 994e3, 996e3])
    assert changes.seeds_of(runs, path, "test_accuracy", side, keys)[-2:] == [99.5, 99.6]


def test_default_target_is_the_workspace(repo, tmp_path):
    r = compare(repo, "--plot", str(tmp_path / "acc.png"))  # pr is checked out
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("## Results: `main` → `workspace`\n")
    assert row(r.stdout, MNIST, "test accuracy %")[2:5] == ["99.33", "99.40", "+0.07"]
    assert f"]({tmp_path / 'acc.png'})" in r.stdout and (tmp_path / "acc.png").stat().st_size


@pytest.mark.parametrize("args,name", [(["main", "nosuch"], "nosuch"),
                                       (["v9", "pr"], "v9"), (["--", "-x"], "-x")])
def test_unknown_revision_is_one_line_exit_2(repo, args, name):
    r = compare(repo, *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: unknown revision or experiment '{name}'")
    assert r.stderr.count("\n") == 1


def test_help_explains_every_flag():
    r = subprocess.run([sys.executable, "-m", "ablation.report.compare", "--help"], env=ENV,
                       capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    for flag, words in (("base", "(default: main)"), ("target", "(default: workspace)"),
                        ("--out OUT", "(atomically)"), ("--plot PLOT", "beside --out"),
                        ("--plot-link PLOT_LINK", "the CI run")):
        assert f" {flag} " in text and words in text, (flag, r.stdout)
    assert text.startswith("usage: python -m ablation.report.compare ")


def test_workflow_passes_actionlint():
    exe = shutil.which("actionlint") or os.path.join(BIN, "actionlint")
    if not os.path.exists(exe):
        msg = "actionlint not installed (the dev extra: pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run([exe, "-no-color", ".github/workflows/compare.yml"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def show_rows(text):
    """[{header: cell}] of `ablation.report.show`'s text, cut at the dashed line's column spans."""
    head, dashes, *lines = text.splitlines()
    spans, pos = [], 0
    for d in dashes.split("  "):
        spans.append((pos, pos + len(d)))
        pos += len(d) + 2
    spans[-1] = (spans[-1][0], None)
    names = [head[a:b].strip() for a, b in spans]
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, spans)} for line in lines]


def test_show_fits_the_width_and_lists_what_each_experiment_changed(repo):
    """`python -m ablation.report.show`: one line per run; an experiment lists the runs it
    changed and the params it changed against its commit; no line wider than asked."""
    def show(width):
        r = subprocess.run([sys.executable, "-m", "ablation.report.show", "--all-commits",
                            "--width", str(width)], cwd=repo, env=ENV, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        assert max(len(line) for line in r.stdout.splitlines()) <= width
        return r.stdout
    rows, by_name, name = show_rows(show(150)), {}, ""
    for r in rows:
        name = r["Experiment"] or name
        by_name.setdefault(name.split()[0], []).append(r)
    pr = by_name["pr"]  # HEAD: every run it has
    assert pr[0]["State"] == "commit"
    runs = {r["Run"]: r for r in pr}
    assert sorted(runs) == ["fashion_mnist resnet18", "mnist resnet18", "mnist svm rbf"]
    mnist, fashion = runs["mnist resnet18"], runs["fashion_mnist resnet18"]
    assert (mnist["acc %"], mnist["img/s"], mnist["train"]) == ("99.40", "333", "15.0 min")
    assert (fashion["acc %"], fashion["img/s"]) == ("88.35", "NaN")
    (exp,) = by_name["table2-mnist_rbf-s0"]  # changed one run: the SVM's
    assert (exp["State"], exp["Run"], exp["acc %"], exp["img/s"], exp["train"]) == \
        ("success", "mnist svm rbf", "92.00", "—", "2.5 s")
    assert exp["Params changed"] == "data.datasets=[mnist] svm.C=2.0 svm.kernels=[rbf]"
    probe = by_name["probe"]  # same numbers as its commit (run cache): the runs it names
    assert probe[0]["State"] == "restored"
    assert sorted((r["Run"], r["acc %"]) for r in probe) == [
        ("mnist resnet18", "99.33"), ("mnist svm rbf", "91.00")]
    probe = probe[0]
    assert probe["Params changed"] == "data.datasets=[mnist] svm.kernels=[rbf]"
    assert "…" in show(70)  # the params column is cut to what the width leaves


def test_show_keeps_hostile_record_text_off_the_terminal():
    """Names, params and metric values come from files: no control characters reach the
    terminal, long values are bounded, and the width holds."""
    from ablation.report import show
    base = {"params": {"params.yaml": {"data": {"train": {"lr": 0.1}}}},
            "metrics": {"metrics/resnet/mnist/resnet18.json": {"data": {"test_accuracy": 90.0}}},
            "timestamp": "2026-11-29T06:12:31"}
    exp = {"params": {"params.yaml": {"data": {"train": {"lr": "\x1b[2J" + "x" * 5000}}}},
           "metrics": {"metrics/resnet/mnist/resnet18.json": {"data": {
               "test_accuracy": "\x1b]0;pwned\x07" + "9" * 100, "images_per_s": float("inf")}}},
           "timestamp": "2026-11-29T07:00:00"}
    doc = [{"rev": "a" * 40, "name": "main\n", "data": base, "experiments": [
        {"executor": None, "name": "e\x1b[31mred", "revs": [{"rev": "b" * 40, "data": exp}]}]}]
    text = show.render(show.table(doc), 100)
    assert "\x1b" not in text and "\x07" not in text and "\n\n" not in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "e?[31mred" in text and "inf" in text
    odd = [None, 3, {"rev": 5, "data": [], "experiments": {"x": 1}},  # wrong types everywhere
           {"rev": "c" * 40, "data": {"params": {"params.yaml": None}, "metrics": [1]},
            "experiments": [7, {"executor": "x", "revs": [None, {"rev": "d", "data": {
                "metrics": {"metrics/resnet/mnist/resnet18.json": {"data": {
                    "test_accuracy": 10 ** 400, "final_train_loss": float("nan")}}}}}]}]}]
    text = show.render(show.table(odd), 80)
    assert max(len(line) for line in text.splitlines()) <= 80 and "100000000000" in text
    nan_base = {"metrics": {"metrics/resnet/mnist/resnet18.json": {"data": {
        "test_accuracy": 90.0, "final_train_loss": float("nan")}}},
        "params": {"params.yaml": {"data": {"data": {"datasets": ["mnist"]},
                                            "train": {"models": ["resnet18"]}}}}}
    failed = {"params": {"params.yaml": {"data": {"data": {"datasets": ["mnist"]}, "train": {
        "models": ["resnet18"], "lr": 0.5}}}}, "metrics": nan_base["metrics"]}
    rows = show.table([{"rev": "e" * 40, "data": nan_base, "experiments": [
        {"name": "same", "revs": [{"rev": "f" * 40, "data": nan_base}]},
        {"name": "broke", "executor": {"state": "failed"},
         "revs": [{"rev": "a" * 40, "data": failed}]}]}])
    by_name = {r[0]: r for r in rows if r[0]}
    assert by_name["same"][1] == "restored"  # a NaN loss is no change
    assert by_name["broke"][1:4] == ("failed", "—", "—")  # no parent's numbers...
    assert by_name["broke"][-1] == "train.lr=0.5"  # ...but its params


def test_what_changed_reads_hostile_files_as_absent():
    """dvc.yaml, dvc.lock and lock files come from the pull request: whatever they hold, the
    readers return what parses and the names reach Markdown bounded and inert."""
    from ablation.report import changes
    for text in ("stages: [1, 2]", "stages: {a: 3, b: {deps: 7}}", "- x", ": :", "\x00", "",
                 "stages: {a: {deps: [src/x.py, {y: 1}, '${item.x}'], params: 5}}"):
        deps, params = changes.stage_deps(text), changes.stage_params(text)
        assert all(isinstance(k, str) and isinstance(v, list) for k, v in deps.items())
        assert all(isinstance(v, list) for v in params.values())
    assert changes.stage_deps("stages: {a: {deps: [src/x.py, {y: 1}, '${item.x}']}}") == \
        {"src/x.py": ["a"]}
    assert changes.stages_of("src/pkg/m.py", {"src/pkg": ["train"], "src/p": ["svm"]}) == \
        ["train"]
    assert changes.pins("torch==2.14.1\n# c\njunk\nray==2.60.0 ; python_version>'3'\n") == \
        {"torch": "2.14.1", "ray": "2.60.0"}
    assert changes.lock_stages("stages: [1]") == {} and changes.lock_stages("x") == {}
    assert changes.safe("a`b|c\nd" + "e" * 500, 40).count("`") == 0
    assert "\n" not in changes.safe("a\nb") and "\\|" in changes.safe("a|b")
    assert len(changes.safe("x" * 500, 40)) < 80 and "\r" not in changes.safe("a\rb")
    assert changes.machine({"device_name": "cpu`|\x1b" * 50, "threads": 2})[0].count("`") == 0
    assert changes.machine({"threads": 2}) is None  # no device: no machine to compare
    assert not changes.differ(("a", None, "2"), ("a", "AVX2", "2"))  # ISA known on one side
    assert changes.differ(("a", "AVX512", "2"), ("a", "AVX2", "2"))
