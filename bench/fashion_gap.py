"""Controlled runs for the Fashion-MNIST gap (issue 18): the train stage's own model, optimizer,
batches and loop, changing one thing at a time.

    python bench/fashion_gap.py [--data data/prepared/fashion_mnist.npz] [--epochs 2]
                                [--variants ours tensor half flip crop] [--out bench/out/gap]

Variants (everything else is the default setting: ResNet-18, ImageNet stem, batch 16, Adam
0.001, seed 0, the same shuffled batches, the stage's default switches):
  ours    the stage: pixels standardised with the training set's mean and std
  tensor  ToTensor only: pixels in [0, 1]
  half    Normalize(0.5, 0.5): pixels in [-1, 1]
  flip    ours + a random horizontal flip of each training image (p = 0.5)
  crop    ours + a random 28x28 crop of each training image zero-padded by 2 pixels
Each variant's test accuracy after every epoch (eval mode, the whole test set) goes to
<out>/gap.json and a table to <out>/gap.md. A diagnostic, not a stage: nothing here changes
what the pipeline does.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from ablation.core.cli import Parser, UserError, run  # noqa: E402
from ablation.core.io import check_outputs, replace_atomic, write_json  # noqa: E402
from ablation.training import engine  # noqa: E402
from ablation.training.datasets import load_prepared  # noqa: E402
from ablation.training.params import SWITCHES  # noqa: E402

VARIANTS = ("ours", "tensor", "half", "flip", "crop")


def augment(batches, how, gen):
    """Yield (uint8 images, labels) with each image flipped or cropped at random (`gen`)."""
    for xb, yb in batches:
        if how == "flip":
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None], xb.flip(-1), xb)
        elif how == "crop":
            pad = torch.nn.functional.pad(xb, (2, 2, 2, 2))
            di = torch.randint(0, 5, (len(xb),), generator=gen)
            dj = torch.randint(0, 5, (len(xb),), generator=gen)
            xb = torch.stack([p[i:i + 28, j:j + 28] for p, i, j in
                              zip(pad, di.tolist(), dj.tolist())])
        yield xb, yb


def run_variant(name, d, epochs, seed):
    device = torch.device("cpu")
    cfg = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
           "batch_size": 16, "seed": seed, "num_workers": 0, "loader": "dataloader",
           "stem": "imagenet", "compile": False, "compile_mode": "auto", "precision": "fp32",
           **{k: "auto" for k in SWITCHES}}
    sw = engine.resolve_switches(cfg, device)
    mean, std = {"tensor": (0.0, 1.0), "half": (0.5, 0.5)}.get(
        name, (float(d["mean"]), float(d["std"])))
    ctx = engine.RunContext(device, mean, std, sw["channels_last"], False)
    model, step_model, opt, _ = engine.setup_model("resnet18", cfg, device, sw,
                                                   num_classes=10, image_shape=(1, 28, 28))
    x = torch.from_numpy(d["train_images"])
    y = torch.from_numpy(d["train_labels"].astype(np.int64))
    xt = torch.from_numpy(d["test_images"])
    yt = torch.from_numpy(d["test_labels"].astype(np.int64))
    gen = torch.Generator().manual_seed(seed + 7)
    out = []
    for epoch in range(epochs):
        t = time.perf_counter()
        batches = engine.epoch_batches(x, y, cfg, device, epoch, False)
        loss, acc, _, _, _ = engine.train_one_epoch(step_model, opt,
                                                    augment(batches, name, gen), ctx)
        test_acc, _ = engine.evaluate(model, xt, yt, ctx)
        out.append({"epoch": epoch + 1, "train_loss": loss, "train_acc": acc,
                    "test_acc": test_acc, "seconds": time.perf_counter() - t})
        print(f"{name} epoch {epoch + 1}: train {acc:.2f} %, test {test_acc:.2f} % "
              f"({out[-1]['seconds']:.0f} s)", flush=True)
    return out


def main(data, epochs=2, seed=0, variants=VARIANTS, out="bench/out/gap"):
    """Run `variants` for `epochs` each; gap.json (rewritten after each variant, so a killed
    run keeps the finished ones) and gap.md under `out`. Inputs and outputs are checked first."""
    if not 1 <= epochs <= 100:
        raise UserError(f"--epochs {epochs}: allowed 1 to 100")
    if not 0 <= seed < 2 ** 32:
        raise UserError(f"--seed {seed}: allowed 0 to 2**32 - 1")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"--variants {bad[0]!r:.40}: allowed: {', '.join(VARIANTS)}")
    jpath, mpath = os.path.join(out, "gap.json"), os.path.join(out, "gap.md")
    check_outputs(jpath, mpath)
    d = load_prepared(data)
    engine.tune_allocator()
    results = {"data": data, "epochs": epochs, "seed": seed,
               "cpu": engine.device_name(torch.device("cpu")),
               "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
               "variants": {}}
    os.makedirs(out, exist_ok=True)
    for v in variants:
        results["variants"][v] = run_variant(v, d, epochs, seed)
        write_json(results, jpath)
    md = [f"Controlled runs: {data}, ResNet-18, batch 16, Adam 0.001, seed {seed}, "
          f"{results['cpu']}, torch ISA {results['isa']}", "",
          "| variant | " + " | ".join(f"test % ep{e + 1}" for e in range(epochs)) +
          " | train % last epoch |", "|---|" + "---|" * (epochs + 1)]
    for v, rows in results["variants"].items():
        md.append(f"| {v} | " + " | ".join(f"{r['test_acc']:.2f}" for r in rows) +
                  f" | {rows[-1]['train_acc']:.2f} |")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(md) + "\n")
    replace_atomic(write, mpath)
    print("\n".join(md))
    return results


def _cli(argv):
    ap = Parser(prog="python bench/fashion_gap.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/prepared/fashion_mnist.npz")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", default="bench/out/gap")
    a = ap.parse_args(argv)
    main(a.data, a.epochs, a.seed, a.variants, a.out)


if __name__ == "__main__":
    run(_cli)
