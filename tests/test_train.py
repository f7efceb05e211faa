"""train stage: real stage code on shrunk real configs (a few hundred images, one epoch)."""
import copy
import json
import os

import pytest
import torch
import torchvision

from ablation import models, params, train
from ablation.cli import UserError

from .conftest import ROOT

with open(os.path.join(ROOT, params.PARAMS_FILE)) as _f:
    import yaml
    DEFAULTS = params.validate(yaml.safe_load(_f), ["data", "train"])


def cfg(**over):
    c = copy.deepcopy(DEFAULTS)
    c["data"]["train_limit"] = 300
    c["train"].update({"epochs": 1, "device": "cpu", **over})
    return c


def run(c, prepared, tmp_path, model="resnet18", dataset="mnist", tag="a", ckpt=True):
    d = tmp_path / tag
    return train.main(c["train"], c["data"], prepared[dataset], model, str(d / "m.json"),
                      str(d / "m.pt"), str(d / "m.ckpt") if ckpt else None, str(d / "live"),
                      progress=False)


@pytest.mark.parametrize("name,mparams,gfl", [
    ("resnet18", 11.18, 0.0331), ("resnet34", 21.28, 0.0698), ("resnet50", 23.52, 0.0784)])
def test_param_counts_and_fvcore_gflops(name, mparams, gfl):
    assert models.count_params(models.build(name)) / 1e6 == pytest.approx(mparams, abs=0.005)
    assert models.gflops(name, "imagenet") == pytest.approx(gfl, abs=5e-5)


def test_cifar_stem_geometry():
    m = models.build("resnet18", "cifar")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert models.gflops("resnet18", "cifar") > 10 * models.gflops("resnet18", "imagenet")


@pytest.mark.parametrize("k,stride,pad,size", [
    (3, 1, 1, 1), (3, 1, 1, 2), (3, 2, 1, 2), (3, 2, 1, 3), (3, 1, 0, 3), (3, 2, 1, 4),
    (1, 1, 0, 1), (1, 1, 0, 2), (1, 2, 0, 2), (1, 2, 0, 3), (1, 2, 0, 4), (3, 1, 1, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_small_map_conv_matches_conv2d(k, stride, pad, size, bias):
    """Every branch (crop + matmul, strided 1x1 matmul, unfold, fallback) is F.conv2d."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, k, stride, pad, bias=bias)
    fast = copy.deepcopy(conv)
    fast.__class__ = models.SmallMapConv2d
    x = torch.randn(5, 24, size, size, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    y, yf = conv(x), fast(xf)
    torch.testing.assert_close(yf, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(fast.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-5)


def real_batch(prepared, n=16):
    from ablation.prepare import load
    d = load(prepared["mnist"])
    x = train.normalise(torch.from_numpy(d["train_images"][:n]), float(d["mean"]),
                        float(d["std"]), False)
    return x, torch.from_numpy(d["train_labels"][:n].astype("int64"))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("inputs", ["random", "real"])
def test_fast_path_is_the_same_function(name, inputs, request):
    """Outputs and gradients match the stock torchvision model; state_dict keys are its own."""
    torch.manual_seed(0)
    stock = models.build(name)
    fast = models.fast_small_maps(copy.deepcopy(stock))
    kinds = {m.kernel_size for m in fast.modules() if type(m) is models.SmallMapConv2d}
    assert kinds == {(1, 1), (3, 3)}  # every model has 1x1 downsample convs
    ref = torchvision.models.__dict__[name](num_classes=10)
    ref.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    if inputs == "real":
        x, y = real_batch(request.getfixturevalue("prepared"))
    else:
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for m in (stock, fast):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(fast(x), stock(x), rtol=1e-4, atol=1e-4)
    for (k, p), q in zip(fast.named_parameters(), stock.parameters()):
        rel = (p.grad - q.grad).norm() / (q.grad.norm() + 1e-12)
        assert rel < 1e-4, k


def test_determinism_same_seed_same_accuracy(prepared, tmp_path):
    a = run(cfg(), prepared, tmp_path, tag="a")
    b = run(cfg(), prepared, tmp_path, tag="b")
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["final_train_loss"] == b["final_train_loss"]


def test_metrics_model_and_plots(prepared, tmp_path):
    m = run(cfg(), prepared, tmp_path)
    on_disk = json.loads((tmp_path / "a" / "m.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    for key in ("test_accuracy", "train_time_ms", "images_per_s", "data_wait_ms", "eval_time_ms",
                "gflops", "params_m", "peak_memory_mb", "epochs_completed", "diverged",
                "final_train_loss", "device", "device_name", "torch_version", "threads"):
        assert key in m, key
    assert m["epochs_completed"] == 1 and m["diverged"] is False and m["device"] == "cpu"
    assert 0 < m["data_wait_ms"] < m["train_time_ms"]
    art = torch.load(tmp_path / "a" / "m.pt", weights_only=True)
    stock = models.build("resnet18")
    stock.load_state_dict(art["state_dict"])  # loads into a stock model
    assert art["metrics"]["test_accuracy"] == m["test_accuracy"]
    live = tmp_path / "a" / "live" / "plots"
    assert (live / "metrics" / "test" / "accuracy.tsv").read_text().count("\n") == 2
    cm = json.loads((live / "sklearn" / "confusion_matrix.json").read_text())
    assert len(cm) == 10000
    marker = torch.load(tmp_path / "a" / "m.ckpt", weights_only=True)  # finished: no state
    assert marker["complete"] is True and "model" not in marker


def test_divergence_is_recorded_and_exits_normally(prepared, tmp_path):
    m = run(cfg(optimizer="sgd", lr=1e6, momentum=0.9), prepared, tmp_path)
    assert m["diverged"] is True and m["diverged_epoch"] == 1
    assert m["test_accuracy"] is None and m["epochs_completed"] == 0
    assert json.loads((tmp_path / "a" / "m.json").read_text())["diverged"] is True
    plots = tmp_path / "a" / "live" / "plots"  # DVC declares these outputs: they must exist
    assert (plots / "metrics" / "train" / "loss.tsv").exists()
    assert json.loads((plots / "sklearn" / "confusion_matrix.json").read_text()) == []


@pytest.mark.parametrize("over,data_over,match", [
    ({"device": "cuda"}, {}, "train.device = 'cuda': no cuda device"),
    ({}, {"train_limit": 60001}, "data.train_limit"),
])
def test_bad_input_before_work(prepared, tmp_path, over, data_over, match):
    if over.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    c = cfg(**over)
    c["data"].update(data_over)
    with pytest.raises(UserError, match=match):
        run(c, prepared, tmp_path)
    assert not (tmp_path / "a").exists()


def test_unknown_model_lists_valid(prepared, tmp_path):
    with pytest.raises(UserError, match="unknown model 'resnet101' .valid: resnet18, resnet34"):
        run(cfg(), prepared, tmp_path, model="resnet101")


@pytest.mark.slow
def test_learns_mnist_2000_images_one_epoch(prepared, tmp_path):
    """resnet18, 2,000 MNIST images, 1 epoch, batch 16, adam 0.001: >= 70 % on all 10,000."""
    c = cfg(batch_size=16, optimizer="adam", lr=0.001)
    c["data"]["train_limit"] = 2000
    m = run(c, prepared, tmp_path, ckpt=False)
    assert m["test_accuracy"] >= 70.0


def test_resident_loader_yields_the_dataloader_batches():
    """Both loaders give the same shuffled batches for a (seed, epoch); resident slices on-device."""
    x = torch.arange(50 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(50, 28, 28)
    y = torch.arange(50)
    c = dict(DEFAULTS["train"], batch_size=16, seed=3)
    dl = list(train.epoch_batches(x, y, dict(c, loader="dataloader"), torch.device("cpu"), 2, False))
    rs = list(train.epoch_batches(x, y, dict(c, loader="resident"), torch.device("cpu"), 2, False))
    assert [len(b[1]) for b in dl] == [16, 16, 16, 2]
    for (xa, ya), (xb, yb) in zip(dl, rs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(train.epoch_batches(x, y, dict(c, loader="resident"), torch.device("cpu"), 3, False))
    assert not torch.equal(other[0][1], rs[0][1])  # a new order each epoch


def test_auto_device_and_unavailable_device():
    assert train.pick_device("cpu").type == "cpu"
    assert train.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                              "mps" if torch.backends.mps.is_available() else "cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="train.device = 'mps': no mps device on this machine .allowed here: auto, cpu"):
            train.pick_device("mps")


def test_bf16_resident_run_on_cpu_learns(prepared, tmp_path):
    """The GPU-oriented options run on CPU too: resident data, bf16 autocast."""
    c = cfg(loader="resident", precision="bf16")
    c["data"]["train_limit"] = 600
    m = run(c, prepared, tmp_path, ckpt=False)
    assert m["loader"] == "resident" and m["test_accuracy"] > 30.0  # 10 % is chance
