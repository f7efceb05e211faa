"""Which split does a reported accuracy look like? (issue 18's Fashion-MNIST gap)

    python bench/eval_split.py MODEL.pt [MODEL.pt ...] [--dataset NAME]
                               [--data-dir data/prepared] [--out bench/out/gap/eval_split.json]

Evaluates each model file that the `train` stage wrote (`models/<dataset>/<model>.pt`, or a
copy from the DVC cache, which then needs --dataset) on its dataset's test set and on the
training images it was trained on (data.train_limit applied as the stage applies it), both in
eval mode with the stage's normalisation, precision and evaluation loop (engine.evaluate), and
prints both beside the test accuracy the run recorded. The small-map layer paths are not
applied (the stock torchvision module computes the same function), so a prediction or two may
differ from the recorded figure. A notebook that scores its model with the training loader by
mistake reports the second figure as its test accuracy. A diagnostic, not a stage.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from ablation.core.cli import Parser, UserError, bounded, run  # noqa: E402
from ablation.stages.train import select  # noqa: E402
from ablation.training import engine, models  # noqa: E402
from ablation.training.datasets import load_prepared  # noqa: E402


def _field(ck, path, key, kind):
    v = ck.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise UserError(f"{bounded(path)}: '{key}' missing or not a {kind.__name__}: "
                        "not a model file written by the train stage")
    return v


def load_model_file(path):
    """The train stage's model file as a checked dict; UserError for anything else."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, garbage, or a pickle with code in it
        raise UserError(f"{bounded(path)}: unreadable as a model file "
                        f"({type(e).__name__}: {bounded(str(e), 120)})") from None
    if not isinstance(ck, dict):
        raise UserError(f"{bounded(path)}: not a model file written by the train stage")
    for key, kind in (("model", str), ("stem", str), ("state_dict", dict), ("params", dict),
                      ("metrics", dict), ("classes", list), ("mean", float), ("std", float)):
        _field(ck, path, key, kind)
    if not (math.isfinite(ck["mean"]) and math.isfinite(ck["std"]) and ck["std"] > 0):
        raise UserError(f"{bounded(path)}: 'mean'/'std' must be finite with std > 0")
    if not isinstance(ck["params"].get("train"), dict) or \
            not isinstance(ck["params"].get("data"), dict):
        raise UserError(f"{bounded(path)}: 'params' lacks its train and data sections")
    return ck


def evaluate_file(path, data_dir, dataset=None):
    ck = load_model_file(path)
    dataset = dataset or os.path.basename(os.path.dirname(os.path.abspath(path)))
    data_path = os.path.join(data_dir, f"{dataset}.npz")
    if not os.path.exists(data_path):
        raise UserError(f"{bounded(path)}: no prepared dataset {bounded(data_path)} (name the "
                        "dataset with --dataset; a file from the DVC cache needs it)")
    d = load_prepared(data_path)
    if ck["classes"] != [str(c) for c in d["classes"]]:
        raise UserError(f"{bounded(path)}: its classes are not those of {bounded(data_path)}")
    model = models.build(ck["model"], ck["stem"], num_classes=len(d["classes"]))
    try:
        model.load_state_dict(ck["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{bounded(path)}: its weights do not fit {bounded(ck['model'])} "
                        f"({bounded(str(e), 120)})") from None
    train_cfg, data_cfg = ck["params"]["train"], ck["params"]["data"]
    limit = data_cfg.get("train_limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 2):
        raise UserError(f"{bounded(path)}: params data.train_limit = {bounded(repr(limit), 40)} "
                        "(allowed: an integer >= 2 or null)")
    cpu = torch.device("cpu")
    (x_tr, y_tr), (x_te, y_te) = select(d, {"train_limit": limit, "test_limit": None},
                                        "dataloader", cpu)
    ctx = engine.RunContext(cpu, ck["mean"], ck["std"],
                            amp=ck["metrics"].get("precision") == "bf16")
    recorded = ck["metrics"].get("test_accuracy")
    out = {"file": path, "dataset": dataset, "model": ck["model"],
           "lr": train_cfg.get("lr"), "seed": train_cfg.get("seed"),
           "precision": "bf16" if ctx.amp else "fp32", "train_images": len(y_tr),
           "recorded_test_acc": recorded if isinstance(recorded, float) else None}
    for split, x, y in (("test", x_te, y_te), ("train", x_tr, y_tr)):
        out[f"{split}_acc_eval_mode"], _ = engine.evaluate(model, x, y, ctx)
    return out


def _cell(v, fmt=None):
    if v is None:
        return "—"
    if fmt and isinstance(v, float):
        return format(v, fmt)
    return bounded(str(v), 30).replace("|", "/").replace("\n", " ")


def main(models_, data_dir, dataset, out):
    rows = [evaluate_file(p, data_dir, dataset) for p in models_]  # evaluate: no_grad
    for r in rows:  # what came from the file goes into the JSON as plain values
        r["lr"] = r["lr"] if isinstance(r["lr"], (int, float)) else _cell(r["lr"])
        r["seed"] = r["seed"] if isinstance(r["seed"], int) else _cell(r["seed"])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"cpu": engine.device_name(torch.device("cpu")), "rows": rows}, f, indent=1)
    lines = ["| dataset | model | lr | seed | recorded test % | test % (eval mode) "
             "| train images % (eval mode) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {_cell(r['dataset'])} | {_cell(r['model'])} | {_cell(r['lr'])} | "
              f"{_cell(r['seed'])} | {_cell(r['recorded_test_acc'], '.2f')} | "
              f"{r['test_acc_eval_mode']:.2f} | {r['train_acc_eval_mode']:.2f} |" for r in rows]
    print("\n".join(lines))
    return rows


def _cli(argv):
    ap = Parser(prog="python bench/eval_split.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", metavar="MODEL.pt")
    ap.add_argument("--dataset", help="the dataset's name (default: the model file's folder)")
    ap.add_argument("--data-dir", default="data/prepared")
    ap.add_argument("--out", default="bench/out/gap/eval_split.json")
    a = ap.parse_args(argv)
    main(a.models, a.data_dir, a.dataset, a.out)


if __name__ == "__main__":
    run(_cli)
