"""export stage: one trained ResNet as files that load without this package.

    python -m ablation.stages.export --weights models/mnist/resnet18.pt \
        --data data/prepared/mnist.npz --out models/mnist/resnet18

--out is a folder, written whole or not at all (built beside it, then renamed into place):
    model.safetensors  the state dict under torchvision's keys: tensors only, no pickle
    model.onnx         the network in ONNX (opset OPSET, any batch size): input "image" float32
                       (N, channels, H, W), normalised as model.json says; output "logits"
    model.json         what a loader needs (architecture, stem, channels, input shape, the
                       normalisation, class names, opset) and the reference a loaded copy is
                       checked against: this package's fp32 evaluation of the same weights on
                       the test set the train stage scored (accuracy, every prediction's digest,
                       the machine), beside the accuracy the train stage recorded

The weights file is read as data (torch.load weights_only) and checked key by key; a bad one is
one line naming the file and the key, exit status 2, and no folder written.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings

import numpy as np
import torch

from ablation.core.cli import Parser, UserError, bounded, run
from ablation.core.io import OutputLock, check_outputs
from ablation.training import engine, models
from ablation.training.datasets import limited, load_prepared

OPSET = 18  # the ONNX opset written (torch.onnx's dynamo exporter; ONNX Runtime >= 1.14 reads it)
FILES = ("model.safetensors", "model.onnx", "model.json")


def read_weights(path):
    """The train stage's weights file as a checked dict: model, stem, state_dict, classes,
    mean, std, params, metrics. Anything else is a UserError naming the file and the key."""
    def bad(key, what):
        raise UserError(f"{bounded(path)}: not a weights file of the train stage: {key} {what}")
    if not os.path.isfile(path):
        raise UserError(f"{bounded(path)}: weights not found (run `dvc repro train`)")
    try:
        with warnings.catch_warnings():  # torch warns of a file's pickle protocol: noise here
            warnings.simplefilter("ignore")
            w = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, a pickle of code: all refused alike
        raise UserError(f"{bounded(path)}: unreadable as a weights file "
                        f"({type(e).__name__})") from None
    if not isinstance(w, dict):
        bad("(the file)", "is not a dict")
    if w.get("model") not in models.MODELS:
        bad("'model'", f"must be one of {', '.join(models.MODELS)}")
    if w.get("stem") not in models.STEMS:
        bad("'stem'", f"must be one of {', '.join(models.STEMS)}")
    classes = w.get("classes")
    if not isinstance(classes, list) or not 2 <= len(classes) <= 1000 or \
            not all(isinstance(c, str) and len(c) <= 100 for c in classes):
        bad("'classes'", "must be 2 to 1000 class names")
    for key in ("mean", "std"):
        if not isinstance(w.get(key), float) or not np.isfinite(w[key]) or \
                (key == "std" and w[key] <= 0):
            bad(f"'{key}'", "must be a finite number" + (" > 0" if key == "std" else ""))
    sd = w.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        bad("'state_dict'", "must map names to tensors")
    for key in ("params", "metrics"):
        if not isinstance(w.get(key), dict):
            bad(f"'{key}'", "must be the run's record (a mapping)")
    return w


def stock_model(w, channels):
    """torchvision's architecture with the train stage's first convolution and stem, holding
    the weights: what model.json tells a stock torch + torchvision loader to build."""
    model = models.build(w["model"], w["stem"], len(w["classes"]), channels)
    try:
        model.load_state_dict(w["state_dict"])
    except RuntimeError as e:
        raise UserError(f"state_dict does not fit {w['model']} ({w['stem']} stem): "
                        f"{bounded(str(e), 300)}") from None
    return model.eval()


def reference(model, w, d):
    """This package's fp32 evaluation of `model` on the test images the run was scored on
    (data.test_limit of the run's record): accuracy %, the predictions' SHA-256 (int64 bytes,
    in test-set order) and the machine."""
    te = limited(len(d["test_labels"]), w["params"].get("data", {}).get("test_limit"), "test")
    x = torch.from_numpy(d["test_images"][te])
    y = torch.from_numpy(d["test_labels"][te].astype(np.int64))
    ctx = engine.RunContext(torch.device("cpu"), w["mean"], w["std"])
    with torch.no_grad():
        acc, pred = engine.evaluate(model, x, y, ctx)
    return {"accuracy": acc, "images": len(y), "test_limit": w["params"]["data"].get("test_limit"),
            "predictions_sha256": hashlib.sha256(pred.numpy().astype("<i8").tobytes()).hexdigest(),
            "cpu": engine.device_name(torch.device("cpu")), "isa": engine.cpu_isa(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def describe(w, shape, ref):
    stem = models.STEMS[w["stem"]]
    rec = w["metrics"]
    return {"architecture": w["model"], "stem": w["stem"],
            "conv1": {k: stem[k] for k in ("kernel_size", "stride", "padding")},
            "maxpool": stem["maxpool"], "channels": shape[0], "input_shape": list(shape),
            "classes": w["classes"], "mean": w["mean"], "std": w["std"],
            "normalise": "x = (pixels / 255 - mean) / std, pixels uint8 (N, H, W) -> "
                         "float32 (N, channels, H, W)",
            "onnx": {"opset": OPSET, "input": "image", "output": "logits"},
            "reference": ref,
            "recorded": {k: rec.get(k) for k in ("test_accuracy", "precision", "device_name",
                                                  "cpu_isa", "diverged", "pruned")}}


def write_folder(tmp, model, meta, shape):
    from safetensors.torch import save_file
    os.makedirs(tmp)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"),
              metadata={"architecture": meta["architecture"], "stem": meta["stem"]})
    x = torch.zeros(2, *shape)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=OPSET,
                                 input_names=["image"], output_names=["logits"],
                                 dynamic_shapes=({0: batch},), verbose=False)
    prog.save(os.path.join(tmp, "model.onnx"))
    meta["sha256"] = {}
    for name in FILES[:2]:
        with open(os.path.join(tmp, name), "rb") as f:
            meta["sha256"][name] = hashlib.file_digest(f, "sha256").hexdigest()
    with open(os.path.join(tmp, "model.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def replace_folder(tmp, out):
    """Rename the finished `tmp` onto `out`; an older `out` is moved aside first, then deleted."""
    old = f"{tmp}.old"
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(weights_path, data_path, out):
    """Export the weights at `weights_path` (scored on `data_path`) into the folder `out`;
    return model.json's content."""
    out = os.path.normpath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{bounded(out)}: is a file, expected a folder to write")
    check_outputs(os.path.join(out, "model.json"))
    w = read_weights(weights_path)
    d = load_prepared(data_path)
    shape = (1, *d["test_images"].shape[1:])
    if len(d["classes"]) != len(w["classes"]):
        raise UserError(f"{bounded(data_path)}: {len(d['classes'])} classes, the weights "
                        f"{bounded(weights_path)} {len(w['classes'])}")
    model = stock_model(w, shape[0])
    meta = describe(w, shape, reference(model, w, d))
    tmp = os.path.join(os.path.dirname(out) or ".", f".{os.path.basename(out)}.tmp{os.getpid()}")
    with OutputLock(out):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_folder(tmp, model, meta, shape)
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ref = meta["reference"]
    print(f"{out}: {', '.join(FILES)}; fp32 reference {ref['accuracy']:.2f}% on "
          f"{ref['images']} test images (recorded {meta['recorded']['test_accuracy']})")
    return meta


def _cli(argv):
    ap = Parser(prog="python -m ablation.stages.export",
                description="Export one trained ResNet as safetensors + ONNX + model.json "
                            "(dvc.yaml's export stage calls this).")
    ap.add_argument("--weights", required=True, help="the train stage's weights (.pt)")
    ap.add_argument("--data", required=True, help="the prepared dataset it was scored on")
    ap.add_argument("--out", required=True, help="folder to write")
    a = ap.parse_args(argv)
    main(a.weights, a.data, a.out)


if __name__ == "__main__":
    run(_cli)
