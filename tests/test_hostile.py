"""Hostile input, table-driven: every case is one clear line, exit status 2, no traceback, no
hang, and nothing created or changed. The corpus runs in one process under a memory cap, so an
expansion bomb fails its case instead of the machine."""
import json
import resource
import subprocess
import sys

import pytest
import yaml

from .helpers import PARAMS, ROOT

MEMORY_CAP = 4 << 30  # bytes of heap (RLIMIT_DATA) for the whole corpus run

TRAIN = ["--data", "d.npz", "--model", "resnet18", "--metrics", "o/m.json", "--out", "o/m.pt",
         "--ckpt", "o/m.ckpt", "--live", "o/live"]
SVM = ["--data", "d.npz", "--kernel", "rbf", "--metrics", "o/m.json", "--out", "o/m.npz"]


def base_params():
    with open(PARAMS) as f:
        p = yaml.safe_load(f)
    p["data"].update(datasets=["mnist"], train_limit=None)
    p["train"].update(epochs=1, device="cpu")
    p["svm"].update(train_samples=100)
    return p


def params_text(section=None, key=None, value=None, raw=None):
    """params.yaml text: the shrunk valid file with one value replaced (YAML source text)."""
    if raw is not None:
        return raw
    text = yaml.safe_dump(base_params(), sort_keys=False, default_flow_style=None)
    if section is None:
        return text
    lines = text.splitlines()
    start = lines.index(f"{section}:")
    for i in range(start + 1, len(lines)):
        if lines[i].startswith(f"  {key}:"):
            lines[i] = f"  {key}: {value}"
            return "\n".join(lines) + "\n"
    raise KeyError(key)


VALID_NPZ = {"npz": "valid"}
CASES = []


def case(id, module, argv, expect, files=None, env=None):
    CASES.append({"id": id, "module": module, "argv": argv, "expect": expect,
                  "files": files or {}, "env": env or {}})


# --- params.yaml through the train and svm command lines -----------------------------------
BAD_VALUES = [  # (section, key, YAML value, text the line must hold)
    ("data", "datasets", "[cifar10]", "data.datasets"),
    ("data", "datasets", "mnist", "a non-empty list"),
    ("data", "datasets", "[[mnist]]", "data.datasets"), ("data", "train_limit", "1", "[2, 60000]"),
    ("data", "train_limit", "all", "data.train_limit"),
    ("data", "train_limit", "-3", "data.train_limit"),
    ("train", "models", "[]", "train.models"),
    ("train", "models", "[resnet18, resnet18]", "distinct"),
    ("train", "models", "[{a: 1}]", "train.models"), ("train", "stem", "5", "imagenet, cifar"),
    ("train", "batch_size", "1", "[2, 65536]"), ("train", "batch_size", "0", "train.batch_size"),
    ("train", "batch_size", "1000000", "[2, 65536]"),
    ("train", "batch_size", "'16'", "train.batch_size"),
    ("train", "batch_size", "true", "train.batch_size"),
    ("train", "batch_size", "16.5", "train.batch_size"),
    ("train", "optimizer", "lion", "one of sgd, adam"),
    ("train", "optimizer", "[adam]", "one of sgd, adam"),
    ("train", "momentum", "-0.1", "train.momentum"), ("train", "momentum", "2", "<= 1"),
    ("train", "lr", "0", "a number > 0"), ("train", "lr", "-1", "a number > 0"),
    ("train", "lr", "fast", "a number > 0"), ("train", "lr", "1" + "0" * 400, "a number > 0"),
    ("train", "lr", ".nan", "a number > 0"), ("train", "lr", ".inf", "a number > 0"),
    ("train", "lr", "1.0e+7", "<= 1e+06"), ("train", "weight_decay", "-1", "train.weight_decay"),
    ("train", "weight_decay", "100", "<= 10"), ("train", "epochs", "0", "[1, 10000]"),
    ("train", "epochs", "100000", "[1, 10000]"), ("train", "epochs", "2.5", "train.epochs"),
    ("train", "pin_memory", "sometimes", "true or false"),
    ("train", "pin_memory", "1", "true or false"),
    ("train", "num_workers", "-1", "[0, 64]"), ("train", "num_workers", "1000", "[0, 64]"),
    ("train", "device", "tpu", "auto, cpu, cuda, mps"),
    ("train", "device", "cuda", "no cuda device"),
    ("train", "loader", "pil", "dataloader, resident"),
    ("train", "precision", "fp16", "fp32, bf16"),
    ("train", "compile", "max", "true or false"), ("train", "compile_mode", "fast", "max-autotune"),
    ("train", "small_maps", "maybe", "auto, true or false"),
    ("train", "channels_last", "[true]", "auto, true or false"),
    ("train", "seed", "-1", "[0, 4294967295]"),
    ("train", "seed", "18446744073709551616", "4294967295"),
    ("train", "seed", "1.5", "train.seed"),
]
for i, (sec, key, val, expect) in enumerate(BAD_VALUES):
    if sec == "train" and key == "device" and val == "cuda":
        continue  # added below only where there is no GPU
    case(f"params-{sec}.{key}-{i}", "train", TRAIN, expect,
         {"params.yaml": params_text(sec, key, val), "d.npz": VALID_NPZ})
SVM_BAD = [
    ("kernels", "[linear]", "rbf, poly"), ("kernels", "rbf", "a non-empty list"),
    ("train_samples", "9", "[10, 60000]"), ("train_samples", "60001", "[10, 60000]"),
    ("C", "0", "a number > 0"), ("C", "1" + "0" * 401, "svm.C"),
    ("gamma", "large", "scale or auto"),
    ("gamma", "0", "scale or auto"), ("gamma", "1" + "0" * 401, "svm.gamma"),
    ("degree", "0", "[1, 10]"), ("degree", "100", "[1, 10]"), ("degree", "100000", "[1, 10]"),
    ("seed", "18446744073709551616", "svm.seed"), ("backend", "cuml", "auto, libsvm, gram"),
]
for i, (key, val, expect) in enumerate(SVM_BAD):
    case(f"params-svm.{key}-{i}", "svm", SVM, expect,
         {"params.yaml": params_text("svm", key, val), "d.npz": VALID_NPZ})

ALIAS_BOMB = "".join(f"a{i}: &a{i} "
                     f"[{', '.join([f'*a{i - 1}'] * 9) if i else 'x, x, x, x, x, x, x, x, x'}]\n"
                     for i in range(10))
FILE_CASES = [  # (id, params.yaml content, text the line must hold)
    ("syntax", "train: [1, 2\n", "YAML syntax error at line"),
    ("empty", "", "file is empty"),
    ("list", "- a\n- b\n", "expected a mapping of sections"),
    ("missing-section", "data: {datasets: [mnist], train_limit: null, test_limit: null}\n",
     "missing section 'train'"),
    ("section-not-mapping", "data: 3\ntrain: {}\n", "section 'data' must be a mapping"),
    ("unknown-key", params_text().replace("  lr: ", "  learning_rate: 0.1\n  lr: "),
     "unknown key 'train.learning_rate'"),
    ("missing-key", params_text().replace("  lr: 0.001\n", ""), "missing key 'train.lr'"),
    ("duplicate-key", params_text().replace("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.1\n"),
     "duplicate key 'lr' at line"),
    ("alias-bomb", ALIAS_BOMB + params_text().replace("models: [resnet18]", "models: *a9"),
     "YAML aliases"),
    ("huge-list", "train:\n  models: [" + ", ".join(["resnet18"] * 500000) + "]\n",
     "bytes, more than the"),
    ("long-list", params_text("train", "models", "[" + ", ".join(["vgg"] * 20000) + "]"),
     "train.models"),
    ("not-utf8", {"hex": (params_text() + "# caf\xe9\n").encode("latin-1").hex()},
     "not UTF-8 text (byte 0xe9 at line"),
    ("binary", {"hex": "00ff" * 100}, "params.yaml"),
    ("deep-nesting", "train: " + "[" * 5000 + "]" * 5000 + "\n", "params.yaml"),
    ("tab-indent", "train:\n\tlr: 1\n", "YAML syntax error"),
    ("key-is-list", params_text().replace("  lr: 0.001", "  [lr]: 0.001"), "params.yaml"),
]
for fid, content, expect in FILE_CASES:
    case(f"params-file-{fid}", "train", TRAIN, expect, {"params.yaml": content, "d.npz": VALID_NPZ})
case("params-file-directory", "train", ["--params", "."] + TRAIN, "is a directory",
     {"d.npz": VALID_NPZ})
case("params-file-missing", "train", ["--params", "nope.yaml"] + TRAIN, "file not found",
     {"d.npz": VALID_NPZ})
case("params-file-svm-duplicate", "svm", SVM, "duplicate key 'C'",
     {"params.yaml": params_text().replace("  C: 1.0\n", "  C: 1.0\n  C: 2.0\n"),
      "d.npz": VALID_NPZ})

# --- prepared data files -----------------------------------------------------------------
DATA_CASES = [
    ("zero-bytes", {"hex": ""}, "unreadable"), ("random", {"hex": "5a17" * 999}, "unreadable"),
    ("truncated", {"npz": "valid", "truncate": True}, "unreadable"),
    ("directory", {"dir": True}, "not a regular file"),
    ("labels-12", {"npz": "labels_12"}, "train_labels hold 0..12, outside 0..9"),
    ("labels-neg", {"npz": "labels_neg"}, "test_labels hold -1..9"),
    ("flat-images", {"npz": "flat_images"}, "expected uint8 (N, H, W)"),
    ("float-images", {"npz": "float_images"}, "train_images is float32"),
    ("more-labels", {"npz": "more_labels"}, "one per image"),
    ("zero-images", {"npz": "zero_images"}, "no test images"),
    ("nan-mean", {"npz": "nan_mean"}, "'mean' and 'std' must be finite"),
    ("zero-std", {"npz": "zero_std"}, "std > 0"),
    ("no-test-images", {"npz": "no_test_images"}, "missing array(s) test_images"),
    ("classes-not-names", {"npz": "object_classes"}, "'classes' must be"),
]
for did, spec, expect in DATA_CASES:
    for module, argv in (("train", TRAIN), ("svm", SVM)):
        case(f"data-{module}-{did}", module, argv, expect,
             {"params.yaml": params_text(), "d.npz": spec})
case("data-train-missing", "train", TRAIN, "prepared data not found",
     {"params.yaml": params_text()})
case("data-svm-one-class", "svm", SVM, "one class only",
     {"params.yaml": params_text(), "d.npz": {"npz": "one_class"}})
case("data-train-limit-above", "train", TRAIN, "data.train_limit = 300: above the 200",
     {"params.yaml": params_text("data", "train_limit", "300"), "d.npz": VALID_NPZ})

# --- output paths ------------------------------------------------------------------------
GOOD = {"params.yaml": params_text(), "d.npz": VALID_NPZ}
for module, argv, flag in (("train", TRAIN, "--metrics"), ("train", TRAIN, "--out"),
                           ("train", TRAIN, "--ckpt"), ("svm", SVM, "--metrics"),
                           ("svm", SVM, "--out")):
    bad = list(argv)
    bad[bad.index(flag) + 1] = "adir"
    case(f"out-{module}{flag}-directory", module, bad, "adir: is a directory",
         {**GOOD, "adir/keep": "x"})
    bad = list(argv)
    bad[bad.index(flag) + 1] = "afile/sub/m.x"
    case(f"out-{module}{flag}-under-a-file", module, bad, "afile is a file",
         {**GOOD, "afile": "x"})
case("out-train-live-under-a-file", "train", TRAIN[:-1] + ["afile/live"], "afile is a file",
     {**GOOD, "afile": "x"})
case("cli-train-unknown-model", "train", ["--model" if a == "--model" else a for a in TRAIN]
     [:3] + ["resnet" + "1" * 300] + TRAIN[4:], "--model: invalid choice: 'resnet111", GOOD)
case("cli-svm-unknown-kernel", "svm", SVM[:3] + ["linear"] + SVM[4:],
     "--kernel: invalid choice: 'linear'", GOOD)

case("cli-train-no-args", "train", [], "the following arguments are required: --data", GOOD)
case("cli-svm-unknown-option", "svm", SVM + ["--colour", "red"], "unrecognized arguments", GOOD)
case("cli-grid-bad-command", "grid", ["launch", "g.yaml"], "invalid choice: 'launch'",
     {"g.yaml": "name: g\nrows: [{id: a}]\n", "params.yaml": params_text()})
case("cli-grid-seeds-text", "grid", ["show", "g.yaml", "--seeds", "many"], "invalid int value",
     {"g.yaml": "name: g\nrows: [{id: a}]\n", "params.yaml": params_text()})

# --- prepare: arguments, outputs, IDX files ---------------------------------------------
case("prepare-no-args", "prepare", [], "python -m ablation.stages.prepare: the following arguments")
case("prepare-unknown-dataset", "prepare", ["cifar10", "o.npz"], "invalid choice: 'cifar10'")
case("prepare-out-directory", "prepare", ["mnist", "adir"], "adir: is a directory",
     {"adir/keep": "x"})
IDX = {"train-images-idx3-ubyte": ("images", 60000), "train-labels-idx1-ubyte": ("labels", 60000),
       "t10k-images-idx3-ubyte": ("images", 10000), "t10k-labels-idx1-ubyte": ("labels", 10000)}
for damage, expect in (("magic", "wrong IDX magic number"), ("truncate", "truncated"),
                       ("header_only", "truncated IDX file"), (None, "SHA-256")):
    files = {f"m/mnist/{n}": {"idx": {"kind": k, "count": c}} for n, (k, c) in IDX.items()}
    files["m/mnist/train-images-idx3-ubyte"]["idx"]["damage"] = damage
    case(f"prepare-idx-{damage}", "prepare", ["mnist", "o.npz"], expect, files,
         {"DATA_MIRROR": "m"})
case("prepare-idx-bad-gzip", "prepare", ["mnist", "o.npz"], "corrupt or truncated gzip",
     {**{f"m/mnist/{n}": {"idx": {"kind": k, "count": c}} for n, (k, c) in IDX.items()},
      "m/mnist/train-images-idx3-ubyte": {"hex": "1f8b0800" + "00" * 20}}, {"DATA_MIRROR": "m"})
case("prepare-mirror-not-dir", "prepare", ["mnist", "o.npz"], "DATA_MIRROR=afile: not a directory",
     {"afile": "x"}, {"DATA_MIRROR": "afile"})

# --- grids, --set, report ----------------------------------------------------------------
GRID_CASES = [  # (id, grid text, extra argv, text the line must hold)
    ("set-list", "name: g\nset: [1, 2]\nrows: [{id: a}]\n", [], "set = [1, 2]: allowed: a mapping"),
    ("label-list", "name: g\ncolumns: [{label: [a], param: train.lr}]\nrows: [{id: a}]\n", [],
     "columns[1].label = ['a']: allowed: a text"),
    ("label-duplicate", "name: g\ncolumns: [{label: a, param: train.lr}, {label: a, param: "
     "train.epochs}]\nrows: [{id: a}]\n", [], "labels must be unique"),
    ("param-unknown", "name: g\ncolumns: [{label: a, param: train.learning_rate}]\n"
     "rows: [{id: a}]\n", [], "'train.learning_rate': allowed: a params.yaml key: train.models"),
    ("metric-unknown", "name: g\ntargets: [train]\ncolumns: [{label: a, metric: acc}]\n"
     "rows: [{id: a}]\n", [], "unknown metric 'acc' of stage train"),
    ("metric-no-stage", "name: g\ncolumns: [{label: a, metric: test_accuracy}]\nrows: [{id: a}]\n",
     [], "name its stage"),
    ("fmt-bad", "name: g\ncolumns: [{label: a, param: train.lr, fmt: .2q}]\nrows: [{id: a}]\n",
     [], "Python format spec"),
    ("note-number", "name: g\nnote: 5\nrows: [{id: a}]\n", [], "note = 5: allowed: a text"),
    ("title-list", "name: g\ntitle: [a]\nrows: [{id: a}]\n", [], "title = ['a']: allowed: a text"),
    ("study-text", "name: g\ntargets: [train]\ncolumns: [{label: a, metric: test_accuracy}]\n"
     "set: {data.datasets: [mnist]}\nrows: [{id: a, study: {a: high}}]\n", [], "a number"),
    ("rows-null", "name: g\nrows:\n", [], "give exactly one of 'rows'"),
    ("rows-empty", "name: g\nrows: []\n", [], "rows = []: allowed: a non-empty list"),
    ("row-id-list", "name: g\nrows: [{id: [a]}]\n", [], "rows[1].id = ['a']: allowed: letters"),
    ("row-set-list", "name: g\nrows: [{id: a, set: [1]}]\n", [], "rows[1].set = [1]: allowed"),
    ("bad-value", "name: g\nrows: [{id: a, set: {train.lr: -1}}]\n", [], "a number > 0"),
    ("factorial-bad", "name: g\nfactorial: {train.lr: 0.1}\n", [], "factorial = {'train.lr': 0.1}"),
    ("not-mapping", "[1, 2]\n", [], "expected a mapping"),
    ("duplicate-key", "name: g\nname: h\nrows: [{id: a}]\n", [], "duplicate key 'name'"),
    ("set-yaml", "name: g\nrows: [{id: a}]\n", ["--set", "train.lr=[1"], "is not YAML"),
    ("set-no-equals", "name: g\nrows: [{id: a}]\n", ["--set", "train.lr"], "expected KEY=VALUE"),
    ("set-unknown", "name: g\nrows: [{id: a}]\n", ["--set", "train.speed=1"],
     "unknown parameter 'train.speed'"),
    ("set-bad-value", "name: g\nrows: [{id: a}]\n", ["--set", "train.epochs=0"], "[1, 10000]"),
    ("tag-seed-like", "name: g\nrows: [{id: a}]\n", ["--set", "train.epochs=1", "--tag", "s1"],
     "--tag 's1'"),
    ("tag-without-set", "name: g\nrows: [{id: a}]\n", ["--tag", "x"], "give --set too"),
    ("seeds-zero", "name: g\nrows: [{id: a}]\n", ["--seeds", "0"], "--seeds 0"),
]
for gid, text, extra, expect in GRID_CASES:
    case(f"grid-{gid}", "grid", ["show", "g.yaml", *extra], expect,
         {"g.yaml": text, "params.yaml": params_text()})
case("grid-missing-file", "grid", ["show", "nope.yaml"], "nope.yaml: file not found",
     {"params.yaml": params_text()})
case("grid-params-syntax", "grid", ["show", "g.yaml"], "params.yaml: YAML syntax error",
     {"g.yaml": "name: g\nrows: [{id: a}]\n", "params.yaml": "train: [1\n"})
case("grid-no-params", "grid", ["show", "g.yaml"], "params.yaml: file not found",
     {"g.yaml": "name: g\nrows: [{id: a}]\n"})
case("grid-params-lack-section", "grid", ["show", "g.yaml"], "no section 'svm'",
     {"g.yaml": "name: g\nrows: [{id: a, set: {svm.C: 2}}]\n",
      "params.yaml": params_text().split("svm:")[0]})
case("report-out-file", "report", ["g.yaml", "--out", "README.md"], "README.md: not a directory",
     {"g.yaml": "name: g\nrows: [{id: a}]\n", "params.yaml": params_text(), "README.md": "x"})
case("report-bad-grid", "report", ["g.yaml"], "unknown key 'colour'",
     {"g.yaml": "name: g\ncolour: red\nrows: [{id: a}]\n", "params.yaml": params_text()})
case("gpu-check-bad-config", "gpu_check", ["--data", "d.npz", "--out", "o", "--config", "c.json"],
     "c.json: JSON syntax error", {"c.json": "{", "d.npz": VALID_NPZ})

EXPORT = ["--weights", "w.pt", "--data", "d.npz", "--out", "o"]
case("export-weights-garbage", "export", EXPORT, "w.pt: unreadable as a weights file",
     {"w.pt": "not a torch file", "d.npz": VALID_NPZ})
case("export-weights-missing", "export", EXPORT, "w.pt: weights not found", {"d.npz": VALID_NPZ})
case("export-out-is-a-file", "export", EXPORT, "o: is a file, expected a folder",
     {"o": "x", "w.pt": "x", "d.npz": VALID_NPZ})
case("models-no-params", "models", ["list"], "params.yaml: file not found", {})
case("models-not-git", "models", ["register", "mnist-resnet18"], "not the top of a git",
     {"params.yaml": params_text(), "dvc.yaml": "stages: {}\n"})
case("models-bad-version", "models", ["register", "x", "--version", "1.0"],
     "expected vMAJOR.MINOR.PATCH", {})
case("models-bad-command", "models", ["delete"], "invalid choice: 'delete'", {})


@pytest.fixture(scope="module")
def results():
    """Run every case once, in one process with at most MEMORY_CAP bytes of heap."""
    cases = list(CASES)
    try:
        import torch
        if not torch.cuda.is_available():
            cases.append({"id": "params-train.device-cuda", "module": "train", "argv": TRAIN,
                          "expect": "no cuda device", "env": {},
                          "files": {"params.yaml": params_text("train", "device", "cuda"),
                                    "d.npz": VALID_NPZ}})
    except ImportError:
        pass

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_CAP, MEMORY_CAP))
    r = subprocess.run([sys.executable, "-m", "tests.hostile_runner"], cwd=ROOT,
                       input=json.dumps(cases), capture_output=True, text=True,
                       preexec_fn=cap, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert len(out) == len(cases), f"{len(out)} results for {len(cases)} cases"
    return {c["id"]: (c, res) for c, res in zip(cases, out)}


def test_corpus_is_large_and_ids_unique():
    assert len(CASES) >= 100 and len({c["id"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("cid", [c["id"] for c in CASES] + ["params-train.device-cuda"])
def test_hostile_case(results, cid):
    if cid not in results:  # only the cuda case is left out, and only where cuda exists
        import torch
        assert cid == "params-train.device-cuda" and torch.cuda.is_available(), cid
        pytest.skip("this machine has a GPU")
    c, r = results[cid]
    assert r["escaped"] is None, r["escaped"]
    lines = r["stderr"].splitlines()
    assert r["code"] == 2 and len(lines) == 1, r
    line = lines[0]
    assert line.startswith("error: ") and len(line) < 500 and "Traceback" not in line, line
    assert c["expect"] in line, line
    assert r["changed"] == [], r["changed"]  # nothing created, changed or removed
