"""The models as a product: every kept model is one dvc.yaml artifact; the export loads in
environments that hold only stock packages (the README's own snippets, run as written) and
classifies as the train stage did; versions and stages are refused when they would lie; and a
second project, its own HOME, gets a model by name and stage over a real sshd."""
import importlib.metadata as md
import json
import os
import pickle
import re
import subprocess
import sys
import venv

import numpy as np
import pytest
import torch
import yaml
from packaging.requirements import Requirement

from ablation.core import outputs
from ablation.core.cli import UserError
from ablation.models import card, registry
from ablation.stages import export
from ablation.training.datasets import limited, load_prepared

from .helpers import ROOT, copy_base
from .sshd import sshd

BIN = os.path.dirname(sys.executable)
NEAR_TIE = 1e-3  # of the largest |logit|: where two fp32 evaluations may order two classes apart


def snippets():
    """The README's Python blocks that load an export: {'torch': code, 'onnx': code}."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return {k: next(b for b in blocks if mark in b)
            for k, mark in (("torch", "safetensors"), ("onnx", "onnxruntime"))}


def closure(names):
    """The installed distributions `names` need, their requirements' closure (extras off)."""
    seen, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen[name] = d = md.distribution(name)
        for r in map(Requirement, d.requires or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen.values()


def stock_env(path, names):
    """A fresh venv (no pip) that sees only `names` and their requirements: its site-packages
    links those distributions' files from this venv; this package, DVC and the rest are not
    there. Returns its python."""
    venv.create(path, with_pip=False)
    site = next((path / "lib").glob("python3*/site-packages"))
    for d in closure(names):
        tops = {f.parts[0] for f in d.files or [] if f.parts[0] != ".."}
        for top in tops:
            src = d.locate_file(top)
            if os.path.exists(src) and not (site / top).exists():
                os.symlink(src, site / top)
    return str(path / "bin" / "python")


@pytest.fixture(scope="session")
def envs(tmp_path_factory):
    d = tmp_path_factory.mktemp("stock")
    return {"torch": stock_env(d / "torch", ["torch", "torchvision", "safetensors"]),
            "onnx": stock_env(d / "onnx", ["onnxruntime", "numpy"])}


def test_stock_envs_hold_only_what_they_name(envs):
    for kind, py in envs.items():
        for mod, there in (("ablation", False), ("dvc", False), ("sklearn", False),
                           ("numpy", True), ("torch", kind == "torch"),
                           ("onnxruntime", kind == "onnx")):
            r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True)
            assert (r.returncode == 0) == there, (kind, mod, r.stderr[-500:])


def test_every_kept_model_is_one_artifact_of_a_stage_output():
    """One dvc.yaml artifact per kept model (its registry name, its path), each pointing at an
    output a stage makes; every model output is an artifact's path or the weights an export
    stage reads; DVC resolves the names."""
    from dvc.repo import Repo
    from dvc.repo.artifacts import check_name_format
    arts = registry.declared(os.path.join(ROOT, "dvc.yaml"))
    kept = registry.kept(os.path.join(ROOT, "params.yaml"))
    with Repo(ROOT) as repo:
        outs = {o.def_path for o in repo.index.outs}
        exported = {d.def_path for s in repo.index.stages if s.name.startswith("export@")
                    for d in s.deps if d.def_path.endswith(".pt")}
    assert sorted(arts) == sorted(m.name for m in kept)
    for m in kept:
        assert [n for n, a in arts.items() if a["path"] == m.path] == [m.name]
        assert arts[m.name]["type"] == "model"
        assert {m.dataset, m.unit} <= set(arts[m.name]["labels"])
    for name, a in arts.items():
        check_name_format(name)
        assert a["path"] in outs, f"{name} points at {a['path']}, no stage's output"
    models = {o for o in outs if o.startswith("models/")}
    assert models == {a["path"] for a in arts.values()} | exported
    assert outputs.artifact_name("svm", "fashion_mnist", "rbf") == "fashion-mnist-svm-rbf"


class Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL",))


@pytest.mark.parametrize("kind", ["random", "pickle-code", "not-ours", "wrong-model"])
def test_export_refuses_a_bad_weights_file_and_writes_nothing(tmp_path, synthetic, kind,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    w = tmp_path / "w.pt"
    if kind == "random":
        w.write_bytes(os.urandom(4096))
    elif kind == "pickle-code":
        w.write_bytes(pickle.dumps({"model": Evil()}))
    else:
        torch.save({"x": torch.zeros(2)} if kind == "not-ours" else
                   {"model": "resnet999", "stem": "imagenet"}, w)
    r = subprocess.run([sys.executable, "-m", "ablation.stages.export", "--weights", str(w),
                        "--data", synthetic, "--out", "out"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "w.pt" in r.stderr and r.stdout == ""
    assert sorted(os.listdir(tmp_path)) == ["w.pt"]  # no folder, no temp, no EVIL


def classify(py, code, folder, images, out):
    """Run a README snippet as written (argv: the export folder, an .npz of test_images) in
    the environment `py`, then save its `logits` to `out`."""
    script = out.with_name(f"load_{out.stem}.py")  # not torch.py: it would shadow torch
    script.write_text(code + "\nimport numpy\nnumpy.save(sys.argv[3], numpy.asarray("
                      "logits.detach() if hasattr(logits, 'detach') else logits))\n")
    r = subprocess.run([py, str(script), str(folder), str(images), str(out)],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


def check_predictions(logits, stage_pred, where):
    """Every prediction equal to the train stage's own, except at a near tie (the top two
    logits closer than NEAR_TIE of the largest |logit|: two fp32 evaluations may order those
    apart on some CPU); returns the number of near ties."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < NEAR_TIE * np.abs(logits).max()
    differ = logits.argmax(1) != stage_pred
    assert not (differ & ~tie).any(), f"{where}: {int((differ & ~tie).sum())} predictions differ"
    return int(tie.sum())


def stage_predictions(repo, dataset="mnist", model="resnet18"):
    cm = repo / outputs.live_dir(outputs.metrics_path("train", dataset, model)) / "plots" / \
        "sklearn" / "confusion_matrix.json"
    return np.array([int(p["predicted"]) for p in json.loads(cm.read_text())])


def scored_images(repo, tmp_path):
    """The test images the shrunk base's train stage scored (data.test_limit), as an .npz."""
    d = load_prepared(str(repo / "data" / "prepared" / "mnist.npz"))
    test_limit = yaml.safe_load((repo / "params.yaml").read_text())["data"]["test_limit"]
    idx = limited(len(d["test_labels"]), test_limit, "test")
    path = tmp_path / "images.npz"
    np.savez(path, test_images=d["test_images"][idx])
    return path, d["test_labels"][idx]


@pytest.mark.slow
def test_the_export_loads_in_stock_torch_and_onnxruntime_as_the_stage_scored(
        shrunk_base, envs, tmp_path):
    """The shrunk base's export, loaded by the README's snippets in environments with only
    torch + torchvision + safetensors, or only onnxruntime + numpy: the train stage's own
    predictions (its confusion matrix lists every one) and accuracy, ONNX Runtime's logits
    within NEAR_TIE of stock torch's."""
    repo, _ = shrunk_base
    folder = repo / outputs.export_dir("mnist", "resnet18")
    assert sorted(os.listdir(folder)) == ["model.json", "model.onnx", "model.safetensors"]
    images, labels = scored_images(repo, tmp_path)
    stage = stage_predictions(repo)
    code = snippets()
    logits = {k: classify(envs[k], code[k], folder, images, tmp_path / f"{k}.npy")
              for k in ("torch", "onnx")}
    ties = check_predictions(logits["torch"], stage, "stock torch")
    check_predictions(logits["onnx"], stage, "onnxruntime")
    scale = np.abs(logits["torch"]).max()
    assert np.abs(logits["onnx"] - logits["torch"]).max() < NEAR_TIE * scale
    meta = json.loads((folder / "model.json").read_text())
    recorded = json.loads((repo / outputs.metrics_path("train", "mnist", "resnet18")).read_text())
    right = int((logits["torch"].argmax(1) == labels).sum())
    if not ties:  # the accuracy on record (a float32 mean), counted again outside the package
        assert right == round(recorded["test_accuracy"] * len(labels) / 100)
        assert meta["reference"]["accuracy"] == recorded["test_accuracy"]
    assert meta["onnx"]["opset"] == export.OPSET and len(meta["classes"]) == 10


def registry_repo(shrunk_base, tmp_path):
    repo, _ = copy_base(shrunk_base, tmp_path)
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"],
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")

    def sh(*cmd, ok=True, cwd=repo, extra=None):
        r = subprocess.run(cmd, cwd=cwd, env={**env, **(extra or {})}, capture_output=True,
                           text=True)
        assert r.returncode == 0 if ok else r.returncode == 2, (cmd, r.stdout[-2000:],
                                                                 r.stderr[-2000:])
        return r.stdout + r.stderr
    return repo, sh


@pytest.mark.slow
def test_register_refuses_what_a_version_would_misstate(shrunk_base, tmp_path):
    repo, sh = registry_repo(shrunk_base, tmp_path)
    models = [sys.executable, "-m", "ablation.models"]
    name = "mnist-svm-rbf"
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n")
    err = sh(*models, "register", name, ok=False)
    assert "uncommitted changes (params.yaml)" in err and err.count("\n") == 1
    sh("git", "checkout", "params.yaml")
    npz = repo / outputs.model_path("svm", "mnist", "rbf")
    kept_bytes = npz.read_bytes()
    npz.unlink()  # the weights dvc.lock names are not in the workspace
    assert "dvc status" in sh(*models, "register", name, ok=False)
    npz.write_bytes(kept_bytes)
    m = repo / outputs.metrics_path("svm", "mnist", "rbf")
    m.write_text(json.dumps({**json.loads(m.read_text()), "diverged": True}))
    sh("git", "commit", "-qam", "a diverged record")
    assert "diverged is true" in sh(*models, "register", name, ok=False)
    assert sh("git", "tag") == ""  # nothing was tagged
    sh("git", "revert", "--no-edit", "HEAD")
    assert "v0.0.1: registered" in sh(*models, "register", name)
    assert "already version v0.0.1" in sh(*models, "register", name, ok=False)
    assert "now prod" in sh(*models, "promote", name, "prod")
    assert "allowed dev, prod" in sh(*models, "promote", name, "qa", ok=False)
    assert "no version v9.9.9" in sh(*models, "promote", name, "dev", "--version", "v9.9.9",
                                     ok=False)
    line = next(x for x in sh(*models, "list").splitlines() if x.startswith(name + " "))
    assert line.split()[:4] == [name, "v0.0.1", "-", "v0.0.1"]


def test_committed_cards_are_what_the_record_writes(monkeypatch):
    """reports/models/*.md: one per kept model, each exactly what `python -m ablation.models
    card` writes from the committed record (regenerate after committing a retrain)."""
    monkeypatch.chdir(ROOT)
    r = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], capture_output=True,
                       text=True)
    assert r.stdout.strip() == "false", "the cards name commits: needs git's full history"
    assert sorted(os.listdir(card.CARDS)) == sorted(f"{m.name}.md" for m in registry.kept())
    assert card.write_cards(check=True) == []


def test_card_interval_is_the_seeds_of_that_setting(monkeypatch):
    """The card's interval is report.stats over the committed record's runs of the kept
    model's setting, recomputed here from the record with scipy."""
    from scipy import stats
    monkeypatch.chdir(ROOT)
    m = next(k for k in registry.kept() if k.name == "mnist-resnet18")
    params = yaml.safe_load(open("params.yaml"))
    seeds = card.seeds_on_record(m, params)
    accs = [s[3] for s in seeds]
    assert len(accs) >= 2 and {s[0] for s in seeds} == {"baseline"}
    half = stats.t.ppf(0.975, len(accs) - 1) * np.std(accs, ddof=1) / np.sqrt(len(accs))
    text = card.render(m, params)
    assert f"{np.mean(accs) - half:.2f} – {np.mean(accs) + half:.2f}] ({len(accs)} seeds)" in text
    with pytest.raises(UserError, match="no artifact 'nope'"):
        registry.find("nope")


@pytest.mark.slow
def test_a_second_project_gets_the_prod_model_over_ssh_and_follows_a_promotion(
        shrunk_base, envs, tmp_path):
    """The git repository and the DVC team remote behind a real sshd; a fresh git + DVC
    project with its own HOME gets mnist-resnet18 by stage, as the README shows, and its
    copy classifies as the train stage did; a new version promoted to prod is what its next
    get receives."""
    with sshd(str(tmp_path)) as server:
        consumer_flow(shrunk_base, envs, tmp_path, server)


def consumer_flow(shrunk_base, envs, tmp_path, server):
    repo, sh = registry_repo(shrunk_base, tmp_path)
    base = f"ssh://{server['user']}@{server['host']}:{server['port']}"
    git_ssh = {"GIT_SSH_COMMAND": f"ssh -i {server['key']} -o StrictHostKeyChecking=no "
                                  f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}
    origin = f"{base}{tmp_path}/origin.git"
    sh("git", "init", "-q", "--bare", "--initial-branch=main", str(tmp_path / "origin.git"),
       cwd=tmp_path)
    sh("dvc", "remote", "add", "-d", "team", f"{base}{tmp_path}/team-storage")
    sh("dvc", "remote", "modify", "--local", "team", "keyfile", server["key"])
    sh("git", "commit", "-qam", "the team's remote")
    sh("dvc", "push", "-q", "-r", "team")
    sh("git", "remote", "set-url", "origin", origin)  # the clone's origin was this checkout
    sh("git", "push", "-q", "origin", "HEAD:main", extra=git_ssh)
    models = [sys.executable, "-m", "ablation.models"]
    name = "mnist-resnet18"
    sh(*models, "register", name, "--push", extra=git_ssh)
    sh(*models, "promote", name, "prod", "--push", extra=git_ssh)

    consumer, home = tmp_path / "consumer", tmp_path / "home-consumer"
    consumer.mkdir()
    home.mkdir()
    env = {"HOME": str(home), "DVC_NO_ANALYTICS": "1", **git_ssh}
    # git's own setting for its SSH (DVC's git transport reads core.sshCommand, not the env)
    sh("git", "config", "--global", "core.sshCommand", git_ssh["GIT_SSH_COMMAND"],
       cwd=consumer, extra=env)
    sh("git", "init", "-q", cwd=consumer, extra=env)
    sh("dvc", "init", "-q", cwd=consumer, extra=env)
    get = ("dvc", "artifacts", "get", origin, name, "--stage", "prod", "--remote-config",
           f"keyfile={server['key']}", "-o")  # into an existing folder, DVC puts it inside
    sh(*get, "model", cwd=consumer, extra=env)
    images, _ = scored_images(repo, tmp_path)
    folder = repo / outputs.export_dir("mnist", "resnet18")
    got = json.loads((consumer / "model" / "model.json").read_text())
    assert got == json.loads((folder / "model.json").read_text())
    logits = classify(envs["torch"], snippets()["torch"], consumer / "model", images,
                      tmp_path / "consumer.npy")
    check_predictions(logits, stage_predictions(repo), "the consumer's copy")

    # a second version (another seed), registered and promoted: the next get receives it
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["train"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh("dvc", "repro", "-q", "export")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "seed 1")
    sh("dvc", "push", "-q", "-r", "team")
    sh("git", "push", "-q", "origin", "HEAD:main", extra=git_ssh)
    assert "v0.0.2: registered" in sh(*models, "register", name, "--push", extra=git_ssh)
    sh(*models, "promote", name, "prod", "--push", extra=git_ssh)
    sh(*get, "model-next", cwd=consumer, extra=env)
    new = json.loads((consumer / "model-next" / "model.json").read_text())
    assert new == json.loads((folder / "model.json").read_text())
    assert new["sha256"] != got["sha256"]
