"""The benchmark and the GPU check, run on CPU: real stage code, tiny sizes.

The CUDA runs themselves happen only on a lent GPU (bench/gpu_check.sh); these tests keep the
code they call working here: the config validates, the fvcore-free paths count the same FLOPs,
the accuracy gate fails below its threshold, the benchmark writes both of its files.
"""
import json
import os
import sys

import pytest

from ablation.bench import gpu_check
from ablation.bench import loop as bench
from ablation.core import cli
from ablation.training import models, params

from .helpers import ROOT

CONFIG = os.path.join(ROOT, gpu_check.CONFIG)


def test_gpu_check_config_validates_and_targets_cuda():
    with open(CONFIG) as f:
        p = params.validate(json.load(f), ["data", "train"], source=CONFIG)
    t = p["train"]
    assert (t["device"], t["loader"], t["precision"], t["epochs"]) == ("cuda", "resident",
                                                                        "bf16", 1)
    assert "resnet18" in t["models"] and "resnet50" in t["models"]


@pytest.mark.parametrize("name", list(models.MODELS))
def test_torch_flop_count_agrees_with_fvcore(name, monkeypatch):
    """Where fvcore is missing (the GPU machine) GFLOPs come from torch's counter instead."""
    with_fvcore = models.gflops(name, "imagenet")
    monkeypatch.setitem(sys.modules, "fvcore", None)  # import fvcore now raises ImportError
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)
    assert models.gflops(name, "imagenet") == pytest.approx(with_fvcore, rel=0.01)
    assert models.gflops(name, "imagenet") != with_fvcore  # the other counter did count


def test_gpu_check_trains_and_gates_on_accuracy(synthetic, tmp_path):
    """The check's own path on CPU: resident bf16 run learns; a 101 % bar fails it."""
    over = {"data": {"train_limit": None}, "train": {"models": ["resnet18"]}}
    with pytest.raises(gpu_check.AccuracyError, match=r"below 101.0% test accuracy: resnet18 "):
        gpu_check.main(synthetic, str(tmp_path), CONFIG, device="cpu",
                       min_accuracy=101.0, overrides=over)
    with open(tmp_path / "resnet18.json") as f:
        m = json.load(f)
    with open(tmp_path / "resnet18.run.json") as f:
        m.update(json.load(f))
    assert (m["device"], m["loader"]) == ("cpu", "resident")
    assert m["test_accuracy"] > 50.0  # chance is 10 %
    assert (tmp_path / "resnet18.pt").exists()


@pytest.mark.parametrize("content,match", [
    (None, "file not found"),
    ("{", "JSON syntax error at line 1"),
    ('{"data": {"datasets": ["mnist"], "train_limit": null, "test_limit": null}, '
     '"train": {"batch_size": 0}}', "train"),
])
def test_gpu_check_bad_config_one_line_exit_2(tmp_path, capsys, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        cli.run(gpu_check._cli, ["--data", "x.npz", "--out", str(tmp_path / "o"),
                                 "--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err and str(path) in err
    assert not (tmp_path / "o").exists()


def test_bench_writes_json_and_table(synthetic, tmp_path):
    """Two steps of each variant, each in its own process: rows, runs and both files."""
    rows = bench.main(synthetic, ["resnet18"], [4], ["sgd"], ["cpu"], steps=2,
                      repeats=1, out_dir=str(tmp_path))
    (r,) = rows
    assert r["reference_ips"] > 0 and r["ours_ips"] > 0
    assert r["ratio"] == pytest.approx(r["ours_ips"] / r["reference_ips"])
    assert len(r["reference_runs"]) == len(r["ours_runs"]) == 1 and r["matmul_gmacs"] > 0
    with open(tmp_path / "bench.json") as f:
        assert json.load(f)["rows"][0]["model"] == "resnet18"
    table = (tmp_path / "bench.md").read_text()
    assert "| cpu | resnet18 | 4 | sgd | dataloader, fp32 |" in table


def test_profile_splits_a_real_step(synthetic, tmp_path):
    """The step profile runs the stage's model and optimizer: per-phase times that add up to
    the step, the profiler's operator time sorted into categories, the file it writes."""
    from ablation.bench import profile
    out = tmp_path / "profile.md"
    profile.main(synthetic, ["resnet18"], [4], "adam", 2, "fp32", 5, str(out))
    text = out.read_text()
    assert text.startswith("## Step profile: ") and "torch ISA" in text
    head = text.split("### resnet18, batch 4, adam, fp32: ")[1].split("\n")[0]
    median, summed = float(head.split(" ms")[0]), float(head.split("add up to ")[1].split(" ms")[0])
    assert median > 0 and summed > 0  # the whole-step median, then the phases' sum
    phase_table = text.split("| operator category")[0]
    shares = [float(line.split("|")[3].strip(" %")) for line in phase_table.splitlines()
              if line.split("|")[1:2] and line.split("|")[1].strip() in profile.PHASES]
    assert len(shares) == len(profile.PHASES) and sum(shares) == pytest.approx(100, abs=0.5)
    cats = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in
            {c for c, _ in profile.CATEGORIES} | {"other"}}
    assert cats["convolution (oneDNN)"] > 0 and cats["optimizer"] > 0  # conv1 and fused Adam
    assert text.count("\n| `") == 5  # --top: five operators listed


def test_profile_categories():
    from ablation.bench.profile import category
    assert category("aten::_fused_adam_") == "optimizer"
    assert category("aten::convolution_backward") == "convolution (oneDNN)"
    assert category("aten::native_batch_norm_backward") == "batch norm"
    assert category("aten::mm") == "matmul (small-map path, fc)"
    assert category("aten::fill_") == "fill / zero / copy / slice grads"
    assert category("aten::something_new") == "other"


def test_profile_reference_side_by_side(synthetic, tmp_path):
    """--reference profiles the study's loop too and sets the two steps side by side: per
    phase the reference's and our ms, whose sums are the whole steps the header compares."""
    from ablation.bench import profile
    out = tmp_path / "profile.md"
    profile.main(synthetic, ["resnet18"], [4], "adam", 2, "fp32", 3, str(out), reference=True)
    text = out.read_text()
    assert "the study's loop (reference)" in text
    side = text.split("the study's step (fp32) against ours (fp32)")[1]
    phase_table = side.split("| operator category")[0]  # "optimizer" is a category too
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in phase_table.splitlines() if line.startswith("| ")
            and line.split("|")[1].strip() in profile.PHASES}
    assert set(rows) == set(profile.PHASES) and all(len(r) == 5 for r in rows.values())
    head = side.split("Sum of the per-phase medians: reference ")[1]
    ref, ours = float(head.split(" ms")[0]), float(head.split("ours ")[1].split(" ms")[0])
    assert ref == pytest.approx(sum(float(r[0]) for r in rows.values()), abs=0.05 * len(rows))
    assert ours == pytest.approx(sum(float(r[1]) for r in rows.values()), abs=0.05 * len(rows))
    whole = side.split("Whole steps, median: reference ")[1]
    ref_step = float(whole.split(" ms")[0])
    our_step = float(whole.split("ours ")[1].split(" ms")[0])
    ratio = float(whole.split("**")[1].rstrip("x"))
    # each step printed to 0.05 ms, the ratio to 0.005
    rounding = ref_step / our_step * (0.05 / ref_step + 0.05 / our_step) + 0.005
    assert ratio == pytest.approx(ref_step / our_step, abs=rounding * 1.01)
    for r in rows.values():  # saved = reference - ours, per phase
        assert float(r[3]) == pytest.approx(float(r[0]) - float(r[1]), abs=0.011)
    # which side is faster is the benchmark's to say, not the test's: three steps of batch 4
    # on a busy CI machine once timed the study's input phase below ours
    assert "| convolution (oneDNN) |" in side


def _bench_script(name):
    """bench/<name>.py (a script, not a package module) loaded as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_split_scores_a_real_model_file_on_both_splits(synthetic, defaults, tmp_path):
    """bench/eval_split.py on a model file the train stage wrote: its test-set figure is the
    one the run recorded (up to a tie flipped by the small-map paths: two predictions), and it
    scores exactly the training images the run used; anything else is one clear error."""
    import torch

    from ablation.stages import train
    es = _bench_script("eval_split")
    c = defaults
    c["data"]["train_limit"] = 320
    c["train"].update({"epochs": 1, "device": "cpu"})
    m = tmp_path / "synthetic" / "resnet18.pt"
    rec = train.main(c["train"], c["data"], synthetic, "resnet18", str(tmp_path / "m.json"),
                     str(m), None, str(tmp_path / "live"), progress=False)
    out = tmp_path / "split.json"
    (row,) = es.main([str(m)], os.path.dirname(synthetic), None, str(out))
    assert row["dataset"] == "synthetic" and row["train_images"] == 320
    assert row["recorded_test_acc"] == rec["test_accuracy"]
    assert row["test_acc_eval_mode"] == pytest.approx(rec["test_accuracy"], abs=2 * 100 / 200)
    # the training images the run used, scored by a plain loop of its own: the stock model
    # with the saved weights, the stage's normalisation, eval mode (ties: two predictions)
    from ablation.training import models
    from ablation.training.datasets import load_prepared
    ck = torch.load(m, weights_only=True)
    net = models.build("resnet18", ck["stem"]).eval()
    net.load_state_dict(ck["state_dict"])
    (x_tr, y_tr), _ = train.select(load_prepared(synthetic), {"train_limit": 320}, "dataloader",
                                   torch.device("cpu"))
    with torch.no_grad():
        pred = net(((x_tr.float() / 255 - ck["mean"]) / ck["std"]).unsqueeze(1)).argmax(1)
    own = 100.0 * (pred == y_tr).float().mean().item()
    assert row["train_acc_eval_mode"] == pytest.approx(own, abs=2 * 100 / 320)
    assert json.loads(out.read_text())["rows"][0]["train_images"] == 320

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(cli.UserError, match="unreadable as a model file"):
        es.main([str(bad)], os.path.dirname(synthetic), "synthetic", str(out))
    ck = torch.load(m, weights_only=True)
    for key, value, match in (("std", 0.0, "std > 0"), ("classes", ["a"] * 10, "classes"),
                              ("mean", "x", "'mean' missing or not a float")):
        torch.save({**ck, key: value}, bad)
        with pytest.raises(cli.UserError, match=match):
            es.main([str(bad)], os.path.dirname(synthetic), "synthetic", str(out))
    with pytest.raises(cli.UserError, match="--dataset"):
        es.main([str(m)], str(tmp_path), None, str(out))
    assert torch.is_grad_enabled()  # nothing global left switched off for the next test


def test_isa_description_names_every_kernel_library(monkeypatch):
    """Benchmark and profile headers name the ISA of ATen, oneDNN and MKL, and say when an
    emulated older ISA leaves MKL (torch's fp32 matmul) on the CPU's best one."""
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    text = bench.isa_description()
    assert "oneDNN max ISA default" in text and "MKL instructions default" in text
    assert "set MKL_ENABLE_INSTRUCTIONS" not in text
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "set MKL_ENABLE_INSTRUCTIONS" in bench.isa_description()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    text = bench.isa_description()
    assert "oneDNN max ISA AVX2, MKL instructions AVX2" in text
    assert "set MKL_ENABLE_INSTRUCTIONS" not in text
    assert bench.describe_machine(["cpu"]).count("torch ISA") == 1


def test_fashion_gap_augments_as_it_says():
    """flip mirrors a random half of the images and leaves the rest as they were; crop is each
    image's 28x28 window of itself zero-padded by 2 pixels; labels pass through."""
    import torch
    fg = _bench_script("fashion_gap")
    x = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8)
    y = torch.arange(256)
    (xf, yf), = fg.augment([(x, y)], "flip", torch.Generator().manual_seed(0))
    same = (xf == x).flatten(1).all(1)
    mirrored = (xf == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and torch.equal(yf, y)
    assert 0.35 < float(mirrored.float().mean()) < 0.65  # p = 0.5 over 256 images
    (xc, yc), = fg.augment([(x, y)], "crop", torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for img, src in zip(xc, pad):
        assert any(torch.equal(img, src[i:i + 28, j:j + 28]) for i in range(5) for j in range(5))
    assert not torch.equal(xc, x) and torch.equal(yc, y)


def test_fashion_gap_runs_variants_and_refuses_bad_input(synthetic, defaults, tmp_path):
    """bench/fashion_gap.py trains the stage's model per variant and records each epoch's
    accuracies; bad arguments and a missing dataset are one clear error before any output."""
    fg = _bench_script("fashion_gap")
    out = tmp_path / "gap"
    res = fg.main(synthetic, epochs=1, variants=["ours", "flip"], out=str(out))
    rec = json.loads((out / "gap.json").read_text())
    assert sorted(rec["variants"]) == ["flip", "ours"] and list(res["variants"]) == ["ours", "flip"]
    for rows in rec["variants"].values():
        (r,) = rows
        assert r["epoch"] == 1 and 0 <= r["test_acc"] <= 100 and 0 <= r["train_acc"] <= 100
    # `ours` is the train stage: the same params, seed, batches and loop give its numbers
    from ablation.stages import train
    p = defaults
    p["train"].update({"epochs": 1, "device": "cpu", "seed": 0})
    p["data"]["train_limit"] = None
    stage = train.main(p["train"], p["data"], synthetic, "resnet18", str(tmp_path / "s.json"),
                       str(tmp_path / "s.pt"), None, None, progress=False)
    ours = rec["variants"]["ours"][0]
    assert ours["test_acc"] == stage["test_accuracy"]
    assert ours["train_loss"] == stage["final_train_loss"]
    md = (out / "gap.md").read_text()
    assert f"| ours | {rec['variants']['ours'][0]['test_acc']:.2f} |" in md
    bad_out = tmp_path / "bad"
    for kw, match in (({"epochs": 0}, "--epochs 0: allowed 1 to 100"),
                      ({"seed": -1}, "--seed -1"),
                      ({"variants": ["mixup"]}, "--variants 'mixup': allowed: ours"),
                      ({"data": str(tmp_path / "none.npz")}, "prepared data not found")):
        with pytest.raises(cli.UserError, match=match):
            fg.main(**{"data": synthetic, "out": str(bad_out), **kw})
    assert not bad_out.exists()
    import torch
    assert torch.is_grad_enabled()
