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
  svm:
    cmd: python svm_stub.py
    deps: [svm_stub.py]
    params: [svm.C]
    metrics:
      - metrics/svm/mnist/rbf.json: {cache: false}
metrics:
"""


def sh(cwd, *cmd):
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def write_run(repo, stem, metrics, acc):
    """A ResNet run's metrics JSON and dvclive's per-epoch test accuracy (header as dvclive's)."""
    os.makedirs(repo / stem / "plots" / "metrics" / "test", exist_ok=True)
    (repo / f"{stem}.json").write_text(json.dumps(metrics))  # NaN stays NaN, as json.dump writes
    (repo / stem / "plots" / "metrics" / "test" / "accuracy.tsv").write_text(
        "step\taccuracy\n" + "".join(f"{i}\t{a}\n" for i, a in enumerate(acc)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """main: ResNet MNIST run + SVM stage; experiments off main; branch pr: lr halved, new
    MNIST numbers and curve, a Fashion-MNIST run that main lacks (images_per_s NaN)."""
    repo = tmp_path_factory.mktemp("compare") / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    shutil.copy(os.path.join(ROOT, "params.yaml"), repo / "params.yaml")
    shutil.copytree(os.path.join(ROOT, "grids"), repo / "grids")
    (repo / "svm_stub.py").write_text(STUB)
    (repo / "dvc.yaml").write_text(DVC_YAML + f"  - {MNIST}.json\n")
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
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "lr 0.0005")
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


def test_pull_request_comment(repo):
    r = compare(repo, "main", "pr", "--out", "out/compare.md")
    assert r.returncode == 0, r.stderr
    md = (repo / "out" / "compare.md").read_text()
    assert r.stdout == md
    assert sorted(os.listdir(repo / "out")) == ["compare.md", "compare.png"]  # no temp files
    assert md.startswith("## Results: `main` → `pr`\n")
    assert "| `params.yaml` `train.lr` | 0.001 | 0.0005 |" in md
    assert "train.epochs" not in md  # only changed params
    assert row(md, MNIST, "test accuracy %")[2:] == ["99.33", "99.40", "+0.07"]
    assert row(md, MNIST, "train time ms")[2:] == ["960,505", "900,000", "-6.3 %"]
    assert row(md, MNIST, "images/s")[2:] == ["312.3", "333.3", "+6.7 %"]
    # data wait share: 5058.77 / 960504.6 = 0.53 %, 9000 / 900000 = 1.00 %
    assert row(md, MNIST, "data wait % of train time")[2:] == ["0.53", "1.00", "+0.47 pp"]
    assert f"| `{FASHION}.json` (new) | test accuracy % | — | 88.35 | new |" in md
    assert row(md, FASHION, "images/s")[2:] == ["—", "NaN", "new"]  # NaN shown as NaN
    assert row(md, FASHION, "data wait % of train time")[2:] == ["—", "—", "new"]  # null
    svm = row(md, "metrics/svm/mnist/rbf.json", "test accuracy %")
    assert svm[2:] == ["91.00", "91.00", "+0.00"]  # unchanged files are listed too (--all)
    assert "study" not in md  # pr runs no grid row
    back = compare(repo, "pr", "main").stdout
    assert f"| `{FASHION}.json` (removed) | test accuracy % | 88.35 | — | removed |" in back
    assert "![Per-epoch test accuracy, main vs pr](compare.png)" in md
    png = (repo / "out" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    import matplotlib.image
    img = matplotlib.image.imread(str(repo / "out" / "compare.png"))
    assert img.shape[1] > img.shape[0] > 300  # two panels side by side


def test_experiment_beside_the_study(repo):
    r = compare(repo, "main", "table2-mnist_rbf-s0")
    assert r.returncode == 0, r.stderr
    md = r.stdout
    assert "| `params.yaml` `svm.C` | 1.0 | 2.0 |" in md
    assert ("Study figures: `grids/table2.yaml`, row `mnist_rbf` (by experiment name; its "
            "params differ from the row's plan: svm.C 2.0).") in md
    svm = "metrics/svm/mnist/rbf.json"
    assert row(md, svm, "test accuracy %")[2:] == ["91.00", "92.00", "+1.00", "95.94"]
    assert row(md, svm, "train time ms")[2:] == ["1,500", "2,500", "+66.7 %", "7,151"]
    assert row(md, MNIST, "test accuracy %")[5] == ""  # no study figure for that file
    assert "Per-epoch" not in md  # no --out, no --plot: no PNG
    probe = compare(repo, "main", "probe").stdout  # no grid name, but the row's params
    assert "row `mnist_rbf` (its params are the row's)" in probe
    assert row(probe, svm, "test accuracy %")[2:] == ["91.00", "91.00", "+0.00", "95.94"]


def test_default_target_is_the_workspace(repo, tmp_path):
    r = compare(repo, "--plot", str(tmp_path / "acc.png"))  # pr is checked out
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("## Results: `main` → `workspace`\n")
    assert row(r.stdout, MNIST, "test accuracy %")[2:] == ["99.33", "99.40", "+0.07"]
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
    assert (fashion["acc %"], fashion["img/s"]) == ("88.35", "nan")
    (exp,) = by_name["table2-mnist_rbf-s0"]  # changed one run: the SVM's
    assert (exp["State"], exp["Run"], exp["acc %"], exp["img/s"], exp["train"]) == \
        ("success", "mnist svm rbf", "92.00", "-", "2.5 s")
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
    assert by_name["broke"][1:4] == ("failed", "-", "-")  # no parent's numbers...
    assert by_name["broke"][-1] == "train.lr=0.5"  # ...but its params
