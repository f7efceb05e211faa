"""Where a stage's outputs lie: the one map from a run (stage, dataset, model or kernel) to its
files, as `dvc.yaml` names them (tests/test_pipeline.py checks the two agree).

    metrics/resnet/<dataset>/<model>.json          train: measurements (`dvc metrics diff`)
    metrics/resnet/<dataset>/<model>.run.json      its record: where and how the run ran
    metrics/resnet/<dataset>/<model>/plots/...     dvclive's per-epoch curves
    models/<dataset>/<model>.pt, .ckpt             the weights, the resumable checkpoint
    models/<dataset>/<model>/                      export: safetensors, ONNX, model.json
    metrics/svm/<dataset>/<kernel>.json (.run.json), models/<dataset>/svm_<kernel>.npz
"""
import os
import re

FAMILY = {"train": "resnet", "svm": "svm"}  # metrics/<family>/...: the stage's folder
WHICH = {"train": ("dataset", "model"), "svm": ("dataset", "kernel")}  # a stage run's parts
LISTS = {"dataset": ("data", "datasets"), "model": ("train", "models"),  # the params list that
         "kernel": ("svm", "kernels")}                                  # each part ranges over
_METRICS_RE = re.compile(r"^metrics/(resnet|svm)/([A-Za-z0-9_]+)/([A-Za-z0-9_]+)\.json$")


def metrics_path(stage, dataset, name):
    """The metrics JSON of one stage run: metrics_path('train', 'mnist', 'resnet18')."""
    return f"metrics/{FAMILY[stage]}/{dataset}/{name}.json"


def parse_metrics_path(path):
    """(stage, dataset, model or kernel) of a metrics JSON's path; None for any other path
    (a record, a curve, a file of some other tool)."""
    m = _METRICS_RE.match(str(path))
    if not m or m.group(3).endswith(".run"):
        return None
    stage = next(s for s, f in FAMILY.items() if f == m.group(1))
    return stage, m.group(2), m.group(3)


def record_path(metrics_path):
    """Where a run's record (environment, resolved settings) lies beside its metrics JSON:
    metrics/resnet/mnist/resnet18.json -> metrics/resnet/mnist/resnet18.run.json."""
    root, ext = os.path.splitext(os.fspath(metrics_path))
    return f"{root}.run{ext or '.json'}"


def live_dir(metrics_path):
    """dvclive's folder of a train run: metrics/resnet/mnist/resnet18."""
    return os.fspath(metrics_path).removesuffix(".json")


def curve_path(metrics_path):
    """dvclive's per-epoch test accuracy of a train run (two columns: step, accuracy)."""
    return f"{live_dir(metrics_path)}/plots/metrics/test/accuracy.tsv"


def model_path(stage, dataset, name):
    """The trained weights: models/mnist/resnet18.pt, models/mnist/svm_rbf.npz."""
    return f"models/{dataset}/{name}.pt" if stage == "train" else \
        f"models/{dataset}/svm_{name}.npz"


def ckpt_path(dataset, model):
    """A train run's per-epoch checkpoint (resume after a kill): models/mnist/resnet18.ckpt."""
    return f"models/{dataset}/{model}.ckpt"


def export_dir(dataset, model):
    """The export stage's folder of a trained ResNet: models/mnist/resnet18 (model.safetensors,
    model.onnx, model.json): what the registry hands out under the model's artifact name."""
    return f"models/{dataset}/{model}"


def artifact_name(stage, dataset, name):
    """A kept model's name in dvc.yaml's `artifacts:` and its GTO tags, from the registries'
    names (DVC allows lower-case letters, digits and dashes): mnist-resnet18,
    fashion-mnist-svm-rbf."""
    parts = (dataset, name) if stage == "train" else (dataset, "svm", name)
    return "-".join(parts).replace("_", "-").lower()


def artifact_path(stage, dataset, name):
    """What an artifact names: a ResNet's export folder, an SVM's .npz (numpy arrays, no pickle)."""
    return export_dir(dataset, name) if stage == "train" else model_path(stage, dataset, name)
