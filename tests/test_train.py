"""train stage: real stage code on shrunk configs (a synthetic dataset; real MNIST where marked)."""
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ablation.core.cli import UserError
from ablation.stages import train
from ablation.training import datasets, engine, models, params, smallmaps

from .helpers import synthetic_arrays

U32 = 2.0 ** -24  # unit roundoff of float32


def gamma(n):
    """Higham's gamma_n: |fl(sum of n products) - exact| <= gamma_n * sum of |products|, for
    any order of summation (blocked, vectorised, with or without FMA), so on every CPU."""
    return n * U32 / (1 - n * U32)


def cfg(defaults, **over):
    c = defaults
    c["data"]["train_limit"] = None
    c["train"].update({"epochs": 1, "device": "cpu", **over})
    return c


def run(c, data, tmp_path, model="resnet18", tag="a", ckpt=True):
    d = tmp_path / tag
    return train.main(c["train"], c["data"], data, model, str(d / "m.json"),
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
    (1, 1, 0, 1), (1, 1, 0, 2), (1, 2, 0, 2), (1, 2, 0, 3), (1, 2, 0, 4), (3, 1, 1, 3),
    (3, 1, 1, 7), (3, 2, 1, 7), (1, 2, 0, 7)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("matmul", [None, True])
def test_small_map_conv_matches_conv2d(k, stride, pad, size, bias, matmul):
    """Every branch (crop + matmul, strided 1x1 matmul, unfold, fallback) computes F.conv2d:
    its float32 output and all gradients lie within the float32 rounding bound of a float64
    F.conv2d (error <= gamma_n x the same sums taken over absolute values). matmul None: the
    untuned rule (tiny outputs only); True: the matmul path at every size, as tuning may pick."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, k, stride, pad, bias=bias)
    fast = copy.deepcopy(conv)
    fast.__class__ = smallmaps.SmallMapConv2d
    fast.matmul = matmul
    x = torch.randn(5, 24, size, size, requires_grad=True)
    y = fast(x)
    g = torch.randn_like(y)
    y.backward(g)

    def reference(f):  # float64 conv of f(x), f(w), f(b): values, or sums of |terms|
        x64 = f(x.detach().double()).requires_grad_()
        w64 = f(conv.weight.detach().double()).requires_grad_()
        b64 = f(conv.bias.detach().double()).requires_grad_() if bias else None
        y64 = F.conv2d(x64, w64, b64, stride, pad)
        y64.backward(f(g.double()))
        return [y64.detach(), x64.grad, w64.grad] + ([b64.grad] if bias else [])

    want, size_of = reference(lambda t: t), reference(torch.abs)
    got = [y, x.grad, fast.weight.grad] + ([fast.bias.grad] if bias else [])
    n = 24 * k * k + 40 * k * k + 5 * size * size + 1  # more terms than any one sum has
    for name, a, w, s in zip(["output", "input grad", "weight grad", "bias grad"], got, want,
                             size_of):
        err = (a.detach().double() - w).abs()
        assert (err <= gamma(n) * s).all(), (name, (err / (s + 1e-300)).max().item())


@pytest.mark.parametrize("stride,size", [(1, 1), (2, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tap_gradients_accumulate_like_autograd(stride, size, layout):
    """The 1x1-output path writes its weight gradient into a reused buffer: over a training
    loop's calls (set_to_none, accumulation without zeroing, zeroing in place) every gradient
    equals float64 autograd through F.conv2d, and the taps no input reaches stay exactly 0;
    the gradient has the weight's own layout (strides), as torch's fused CPU Adam needs (it
    reads grad, state and param as one layout)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, stride, 1, bias=False).double()
    fast = copy.deepcopy(conv)
    fast.__class__ = smallmaps.SmallMapConv2d
    fast.matmul = True
    if layout == "channels_last":
        fast.weight.data = fast.weight.data.contiguous(memory_format=torch.channels_last)
    xs = [torch.randn(4, 6, size, size, dtype=torch.float64) for _ in range(4)]

    def grads(m, x, g):
        x = x.clone().requires_grad_()
        m(x).backward(g)
        return x.grad

    def want(x, g):
        conv.zero_grad(set_to_none=True)
        return grads(conv, x, g), conv.weight.grad.clone()

    gs = [torch.randn(4, 5, 1, 1, dtype=torch.float64) for _ in range(4)]
    gx, gw = want(xs[0], gs[0])
    assert torch.allclose(grads(fast, xs[0], gs[0]), gx, rtol=1e-12, atol=1e-12)
    assert torch.allclose(fast.weight.grad, gw, rtol=1e-12, atol=1e-12)
    unused = torch.ones_like(gw, dtype=torch.bool)
    unused[:, :, 1:1 + size, 1:1 + size] = False
    assert (fast.weight.grad[unused] == 0).all() and unused.any()
    assert fast.weight.grad.stride() == fast.weight.stride()
    grads(fast, xs[1], gs[1])  # no zero_grad: added to the first
    assert torch.allclose(fast.weight.grad, gw + want(xs[1], gs[1])[1], rtol=1e-12, atol=1e-12)
    fast.zero_grad(set_to_none=True)  # the buffer comes back with only this step's taps
    grads(fast, xs[2], gs[2])
    assert torch.allclose(fast.weight.grad, want(xs[2], gs[2])[1], rtol=1e-12, atol=1e-12)
    assert (fast.weight.grad[unused] == 0).all()
    fast.zero_grad(set_to_none=False)  # zeroed in place, then accumulated into
    grads(fast, xs[3], gs[3])
    assert torch.allclose(fast.weight.grad, want(xs[3], gs[3])[1], rtol=1e-12, atol=1e-12)


def test_tap_gradient_buffer_after_other_taps_were_added():
    """A conv seen at two input sizes uses different taps; once the buffer held the other
    taps' gradient, a later step starting afresh (set_to_none) gets exactly its own taps."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, 2, 1, bias=False).double()
    fast = copy.deepcopy(conv)
    fast.__class__ = smallmaps.SmallMapConv2d
    fast.matmul = True
    x1, x2 = (torch.randn(4, 2, s, s, dtype=torch.float64) for s in (1, 2))
    fast(x1).sum().backward()  # the centre tap: written into the buffer
    fast(x2).sum().backward()  # four taps added into the same gradient
    fast.zero_grad(set_to_none=True)
    fast(x1).sum().backward()
    conv(x1).sum().backward()
    assert torch.allclose(fast.weight.grad, conv.weight.grad, rtol=1e-12, atol=1e-12)


def test_tap_path_under_bf16_autocast():
    """Under CPU bf16 autocast the 1x1-output path computes in bf16 like F.conv2d's autocast,
    and hands back float32 gradients within bf16 rounding (8 bits: 2^-8 per product, far
    less over a sum) of float64 autograd."""
    torch.manual_seed(0)
    fast = smallmaps.SmallMapConv2d(64, 32, 3, 1, 1, bias=False)
    fast.matmul = True
    x = torch.randn(8, 64, 1, 1, requires_grad=True)
    g = torch.randn(8, 32, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(g)
    assert x.grad.dtype == torch.float32 and fast.weight.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    w64 = fast.weight.detach().double().requires_grad_()
    F.conv2d(x64, w64, None, 1, 1).backward(g.double())
    for got, ref in ((x.grad, x64.grad), (fast.weight.grad, w64.grad)):
        assert float((got.double() - ref).norm() / ref.norm()) < 2 ** -6


def test_machine_key_names_every_library_isa_limit(monkeypatch):
    """A choice measured under an ISA limit (oneDNN's or MKL's) is not reused without it: each
    limit changes the key, and its value is named in it."""
    for var in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(var, raising=False)
    plain = smallmaps.machine_key()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    mkl = smallmaps.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    both = smallmaps.machine_key()
    assert len({plain, mkl, both}) == 3
    assert "mkl default" in plain and "mkl AVX2" in mkl and "onednn AVX2" in both


def test_tune_measures_each_layer_shape_once_then_reads_the_cache(tmp_path):
    """auto = measured: each distinct conv shape is timed once (both paths), every layer gets
    the path chosen for its shape, the choices are cached; a second model on this machine reads
    them (no measuring) and gets the same paths; a corrupt cache is measured afresh."""
    model = smallmaps.fast_small_maps(models.build("resnet18"))
    first = smallmaps.tune(model, (16, 1, 28, 28), cache=str(tmp_path), reps=2)
    convs = {n for n, m in model.named_modules() if isinstance(m, smallmaps.SmallMapConv2d)}
    assert set(first["matmul"]) | set(first["conv"]) == convs and len(convs) == 19
    assert first["cached"] + first["measured"] == 19 and 5 <= first["measured"] < 19
    cache = json.loads((tmp_path / "smallmaps.json").read_text())
    (entry,) = cache.values()
    assert entry["machine"] == smallmaps.machine_key()
    assert len(entry["shapes"]) == first["measured"]
    assert all(v["conv_ms"] > 0 and v["matmul_ms"] > 0 and v["matmul"] == (
        v["matmul_ms"] < (1 - smallmaps.MARGIN) * v["conv_ms"]) for v in entry["shapes"].values())
    again = smallmaps.fast_small_maps(models.build("resnet18"))
    second = smallmaps.tune(again, (16, 1, 28, 28), cache=str(tmp_path), reps=2)
    assert (second["measured"], second["cached"]) == (0, 19)
    assert second["matmul"] == first["matmul"]
    assert {n: m.matmul for n, m in again.named_modules() if n in convs} == \
        {n: n in first["matmul"] for n in convs}
    (tmp_path / "smallmaps.json").write_text('{"x": [1, 2')
    third = smallmaps.tune(smallmaps.fast_small_maps(models.build("resnet18")),
                           (16, 1, 28, 28), cache=str(tmp_path), reps=2)
    assert third["measured"] == first["measured"]


def real_batch(prepared, n=32):
    d = datasets.load_prepared(prepared["mnist"])
    ctx = engine.RunContext(torch.device("cpu"), float(d["mean"]), float(d["std"]))
    x = engine.normalise(torch.from_numpy(d["train_images"][:n]), ctx)
    return x, torch.from_numpy(d["train_labels"][:n].astype("int64"))


def forward_backward(model, x, y):
    """Output and {name: gradient} of the cross-entropy loss, both as float64."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach().double(), {k: p.grad.double() for k, p in model.named_parameters()}


def rel(a, b):
    """Relative distance |a - b| / |b| of tensors, or of {name: tensor} taken as one vector."""
    if isinstance(b, dict):
        num = sum(float((a[k] - b[k]).square().sum()) for k in b)
        return (num / sum(float(b[k].square().sum()) for k in b)) ** 0.5
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("inputs", ["random", "real"])
def test_fast_path_is_the_same_function(name, inputs, request):
    """In float64 the fast path is the stock model: outputs and every gradient agree to 1e-9
    (measured: <= 1e-13). In float32 neither is exact, and the fast path is no further from the
    float64 result than the stock model is. state_dict keys are torchvision's own."""
    torch.manual_seed(0)
    stock = models.build(name)
    fast = smallmaps.fast_small_maps(copy.deepcopy(stock))
    kinds = {m.kernel_size for m in fast.modules() if type(m) is smallmaps.SmallMapConv2d}
    assert kinds == {(1, 1), (3, 3)}  # every model has 1x1 downsample convs
    ref = torchvision.models.__dict__[name](num_classes=10)
    ref.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    if inputs == "real":
        x, y = real_batch(request.getfixturevalue("prepared"))
    else:
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    out64, g64 = forward_backward(copy.deepcopy(stock).double(), x.double(), y)
    fout64, fg64 = forward_backward(copy.deepcopy(fast).double(), x.double(), y)
    assert rel(fout64, out64) < 1e-9
    for k in g64:
        assert rel(fg64[k], g64[k]) < 1e-9, k
    out_s, g_s = forward_backward(stock, x, y)
    out_f, g_f = forward_backward(fast, x, y)
    assert rel(out_f, out64) <= 2 * rel(out_s, out64) + 1e-6
    # float32 gradients of these nets sit 1e-6 to 4e-2 from float64, for stock and fast alike
    # (train-mode BatchNorm over 1x1 maps, ReLU kinks; measured on AVX-512, AVX2 and SSE4.1
    # kernels); one flipped kink moves one model by 1e-2 while the other stays at 1e-5, so the
    # bound is a factor of stock's distance plus 5 % -- far below a wrong gradient's ~100 %.
    assert rel(g_f, g64) <= 3 * rel(g_s, g64) + 0.05


def test_determinism_same_seed_same_accuracy(defaults, synthetic, tmp_path):
    a = run(cfg(defaults), synthetic, tmp_path, tag="a")
    b = run(cfg(defaults), synthetic, tmp_path, tag="b")
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["final_train_loss"] == b["final_train_loss"]


def test_metrics_model_and_plots(defaults, synthetic, tmp_path):
    m = run(cfg(defaults), synthetic, tmp_path)
    on_disk = json.loads((tmp_path / "a" / "m.json").read_text())
    record = json.loads((tmp_path / "a" / "m.run.json").read_text())
    assert sorted(on_disk) == sorted(params.METRICS["train"])  # measurements only
    assert sorted(record) == sorted(params.RECORD["train"])  # where and how it ran
    assert {**on_disk, **record} == json.loads(json.dumps(m))
    for key in ("test_accuracy", "train_time_ms", "images_per_s", "data_wait_ms", "eval_time_ms",
                "gflops", "params_m", "peak_memory_mb", "epochs_completed", "diverged",
                "final_train_loss", "device", "device_name", "torch_version", "threads"):
        assert key in m, key
    assert m["epochs_completed"] == 1 and m["diverged"] is False and m["device"] == "cpu"
    assert m["train_images"] == len(synthetic_arrays()["train_labels"])
    assert 0 < m["data_wait_ms"] < m["train_time_ms"]
    art = torch.load(tmp_path / "a" / "m.pt", weights_only=True)
    stock = models.build("resnet18")
    stock.load_state_dict(art["state_dict"])  # loads into a stock model
    assert art["metrics"]["test_accuracy"] == m["test_accuracy"]
    live = tmp_path / "a" / "live" / "plots"
    assert (live / "metrics" / "test" / "accuracy.tsv").read_text().count("\n") == 2
    cm = json.loads((live / "sklearn" / "confusion_matrix.json").read_text())
    assert len(cm) == len(synthetic_arrays()["test_labels"])
    marker = torch.load(tmp_path / "a" / "m.ckpt", weights_only=True)  # finished: no state
    assert marker["complete"] is True and "model" not in marker


def busy_elsewhere(seconds):
    """A busy loop in a process that is not ours (orphaned by a shell): other processes' CPU."""
    code = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
    r = subprocess.run(["sh", "-c", f"'{sys.executable}' -c '{code}' >/dev/null 2>&1 & echo $!"],
                       check=True, capture_output=True, text=True)
    return int(r.stdout)


def test_a_run_records_the_load_others_put_on_its_machine(defaults, synthetic, tmp_path):
    """Another process's busy loop during the timed epoch: the record says so (its share of a
    core under whatever else runs: far above an idle machine's 0.0x), and when the timed work
    ended; core.cores.Load alone counts a busy loop elsewhere and not one of its own."""
    from ablation.core.cores import Load
    busy_elsewhere(2.5)
    with Load() as load:
        t = time.monotonic()
        while time.monotonic() - t < 1.5:
            pass
    assert load.cores > 0.3
    before = datetime.now(timezone.utc).replace(microsecond=0)
    pid = busy_elsewhere(900)  # outlives the run however slow the machine: killed below
    try:
        m = run(cfg(defaults), synthetic, tmp_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert m["other_load_cores"] > 0.3
    assert before <= datetime.fromisoformat(m["timed_end"]) <= datetime.now(timezone.utc)


def test_a_search_stops_its_trial_at_the_epoch_it_decides(defaults, synthetic, tmp_path,
                                                          monkeypatch):
    """A trial of 3 epochs whose search answers `go` after epoch 1 and `stop` after epoch 2:
    it stops after epoch 2 and records it (pruned, 2 epochs, the accuracy of epoch 2, the
    weights of epoch 2); the same params without a search folder run all 3 epochs."""
    verdicts = tmp_path / "verdicts"
    verdicts.mkdir()
    (verdicts / "1").write_text("go")
    (verdicts / "2").write_text("stop")
    monkeypatch.setenv("ABLATION_TRIAL_DIR", str(verdicts))
    m = run(cfg(defaults, epochs=3, trial="s-t1-s0"), synthetic, tmp_path)
    assert m["pruned"] is True and m["epochs_completed"] == 2
    curve = (tmp_path / "a" / "live" / "plots" / "metrics" / "test" / "accuracy.tsv")
    rows = curve.read_text().splitlines()[1:]  # step, accuracy: one row per epoch run
    assert len(rows) == 2 and float(rows[-1].split("\t")[-1]) == pytest.approx(
        m["test_accuracy"])
    assert json.loads((tmp_path / "a" / "m.json").read_text())["pruned"] is True
    monkeypatch.delenv("ABLATION_TRIAL_DIR")
    full = run(cfg(defaults, epochs=3, trial="s-t1-s0"), synthetic, tmp_path, tag="b")
    assert full["pruned"] is False and full["epochs_completed"] == 3


def test_learns_synthetic_in_one_epoch(defaults, synthetic, tmp_path):
    """640 images, 40 steps: accuracy far above chance (10 %) and the loss falls below ln 10."""
    m = run(cfg(defaults), synthetic, tmp_path, ckpt=False)
    assert m["test_accuracy"] > 50.0 and m["final_train_loss"] < 2.0


def test_divergence_is_recorded_and_exits_normally(defaults, synthetic, tmp_path):
    m = run(cfg(defaults, optimizer="sgd", lr=1e6, momentum=0.9), synthetic, tmp_path)
    assert m["diverged"] is True and m["diverged_epoch"] == 1
    assert m["test_accuracy"] is None and m["epochs_completed"] == 0
    assert json.loads((tmp_path / "a" / "m.json").read_text())["diverged"] is True
    plots = tmp_path / "a" / "live" / "plots"  # DVC declares these outputs: they must exist
    assert (plots / "metrics" / "train" / "loss.tsv").exists()
    assert json.loads((plots / "sklearn" / "confusion_matrix.json").read_text()) == []


@pytest.mark.parametrize("over,data_over,match", [
    ({"device": "cuda"}, {}, "train.device = 'cuda': no cuda device"),
    ({}, {"train_limit": 641}, "data.train_limit = 641: above the 640 training images"),
])
def test_bad_input_before_work(defaults, synthetic, tmp_path, over, data_over, match):
    if over.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    c = cfg(defaults, **over)
    c["data"].update(data_over)
    with pytest.raises(UserError, match=match):
        run(c, synthetic, tmp_path)
    assert not (tmp_path / "a").exists()


def test_unknown_model_lists_valid(synthetic, tmp_path, capsys):
    """The command line checks the model name (once); nothing is created."""
    from ablation.core import cli
    with pytest.raises(SystemExit) as e:
        cli.run(train._cli, ["--data", synthetic, "--model", "resnet101", "--metrics",
                             str(tmp_path / "a" / "m.json"), "--out", str(tmp_path / "a" / "m.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'resnet101'" in err
    assert all(name in err for name in ("resnet18", "resnet34", "resnet50"))
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_learns_mnist_2000_images_one_epoch(defaults, prepared, tmp_path):
    """resnet18, 2,000 MNIST images, 1 epoch, batch 16, adam 0.001: >= 70 % on all 10,000."""
    c = cfg(defaults, batch_size=16, optimizer="adam", lr=0.001)
    c["data"]["train_limit"] = 2000
    m = run(c, prepared["mnist"], tmp_path, ckpt=False)
    assert m["test_accuracy"] >= 70.0


def test_resident_loader_yields_the_dataloader_batches(defaults):
    """Both loaders give the same shuffled batches for a (seed, epoch); resident slices
    on-device."""
    x = (torch.arange(50 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8)
         .view(50, 28, 28))
    y = torch.arange(50)
    c = dict(defaults["train"], batch_size=16, seed=3)
    dl = list(engine.epoch_batches(x, y, dict(c, loader="dataloader"), torch.device("cpu"), 2,
                                   False))
    rs = list(engine.epoch_batches(x, y, dict(c, loader="resident"), torch.device("cpu"), 2, False))
    assert [len(b[1]) for b in dl] == [len(b[1]) for b in rs] == [16, 16, 16, 2]
    for (xa, ya), (xb, yb) in zip(dl, rs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(engine.epoch_batches(x, y, dict(c, loader="resident"), torch.device("cpu"), 3,
                                      False))
    assert not torch.equal(other[0][1], rs[0][1])  # a new order each epoch


def test_auto_device_and_unavailable_device():
    assert engine.pick_device("cpu").type == "cpu"
    assert engine.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                              "mps" if torch.backends.mps.is_available() else "cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="train.device = 'mps': no mps device on this machine "
                                            ".allowed here: auto, cpu"):
            engine.pick_device("mps")


def test_bf16_resident_run_on_cpu_learns(defaults, synthetic, tmp_path):
    """The GPU-oriented options run on CPU too: resident data, bf16 autocast."""
    m = run(cfg(defaults, loader="resident", precision="bf16"), synthetic, tmp_path, ckpt=False)
    assert m["loader"] == "resident" and m["test_accuracy"] > 50.0  # 10 % is chance


@pytest.mark.slow
def test_compiled_run_on_cpu_learns(defaults, synthetic, tmp_path):
    """torch.compile (inductor, the path train.compile takes on any device) trains the model
    the train stage builds, on CPU, with channels_last and resident data as on a GPU."""
    m = run(cfg(defaults, loader="resident", compile=True, compile_mode="default",
                small_maps=False, channels_last=True), synthetic, tmp_path, ckpt=False)
    assert m["compile_mode"] == "default" and m["channels_last"] is True
    assert m["test_accuracy"] > 50.0  # 10 % is chance


def test_switches_resolved_once_and_recorded(defaults, synthetic, tmp_path):
    """auto on CPU: the matmul path where measured faster, the fused optimizer, malloc tuning;
    no channels_last, no compile; nothing pinned. Every resolved value is in the record,
    the measured path of each of ResNet-18's 19 3x3/1x1 convolutions too."""
    m = run(cfg(defaults), synthetic, tmp_path, ckpt=False)
    paths = m["small_map_paths"]
    assert len(paths["matmul"]) + len(paths["conv"]) == 19
    assert paths["measured"] + paths["cached"] == 19
    assert {k: m[k] for k in ("small_maps", "channels_last", "fused_optimizer", "malloc_tuning",
                              "compile_mode", "pin_memory_effective")} == {
        "small_maps": True, "channels_last": False, "fused_optimizer": True,
        "malloc_tuning": engine._mallopt() is not None, "compile_mode": None,
        "pin_memory_effective": False}
    # what the run recorded is what the grid checks columns against: measurements in the
    # metrics file, environment and resolved switches in the record beside it
    assert set(m) == set(params.METRICS["train"]) | set(params.RECORD["train"])


def test_switches_off_are_honoured(defaults, synthetic, tmp_path, monkeypatch):
    built, real = [], engine.setup_model

    def spy(*args):
        built.append(real(*args))
        return built[-1]
    monkeypatch.setattr(engine, "setup_model", spy)
    c = cfg(defaults, small_maps=False, fused_optimizer="off", channels_last=True)
    m = run(c, synthetic, tmp_path, ckpt=False)
    assert (m["small_maps"], m["fused_optimizer"], m["channels_last"]) == (False, False, True)
    model, _, opt, paths = built[0]
    assert paths is None and m["small_map_paths"] is None
    assert not any(type(x) is smallmaps.SmallMapConv2d for x in model.modules())
    assert opt.defaults["fused"] in (False, None)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_switch_on_where_impossible_is_an_error_before_work(defaults, synthetic, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(engine, "_mallopt", lambda: None)  # as on a musl libc
    with pytest.raises(UserError, match="train.malloc_tuning = true: not available on cpu "
                                        "here .allowed here: auto, false"):
        run(cfg(defaults, malloc_tuning=True), synthetic, tmp_path)
    assert not (tmp_path / "a").exists()
    assert engine.resolve_switches(cfg(defaults, malloc_tuning="auto")["train"],
                                  torch.device("cpu"))["malloc_tuning"] is False


def test_trailing_batch_of_one_is_dropped_and_recorded(defaults, synthetic, tmp_path):
    """33 images at batch 16: two batches; a batch of one would fail in train-mode BatchNorm."""
    x, y = torch.zeros(33, 28, 28, dtype=torch.uint8), torch.arange(33)
    c = dict(defaults["train"], batch_size=16)
    assert [len(b[1]) for b in engine.epoch_batches(x, y, c, torch.device("cpu"), 0, False)] == \
        [16, 16]
    assert engine.dropped_per_epoch(34, 16) == 0 and engine.dropped_per_epoch(1, 16) == 0
    d = cfg(defaults, batch_size=16)
    d["data"]["train_limit"] = 17
    m = run(d, synthetic, tmp_path, ckpt=False)
    assert m["dropped_per_epoch"] == 1 and m["train_images"] == 17 and m["epochs_completed"] == 1


def test_second_writer_of_the_same_outputs_fails_fast(defaults, synthetic, tmp_path):
    from ablation.core.io import OutputLock
    with OutputLock(tmp_path / "a" / "m.json"):
        with pytest.raises(UserError, match=r"another run is writing these outputs \(pid "
                                            rf"{os.getpid()} on "):
            run(cfg(defaults), synthetic, tmp_path)
    assert not (tmp_path / "a" / ".m.json.lock").exists()  # released and removed
    run(cfg(defaults), synthetic, tmp_path, ckpt=False)  # now it runs
    assert (tmp_path / "a" / "m.json").exists() and not (tmp_path / "a" / ".m.json.lock").exists()


def test_unknown_names_in_direct_calls_are_one_clear_error(defaults, synthetic, tmp_path):
    """main() called directly (not through the schema or a command line): the builders' one
    lookup names the valid values, before anything is created."""
    with pytest.raises(UserError, match=r"unknown model 'resnet101' \(valid: resnet18, resnet34"):
        run(cfg(defaults), synthetic, tmp_path, model="resnet101")
    with pytest.raises(UserError, match=r"unknown optimizer 'rmsprop' \(valid: sgd, adam\)"):
        run(cfg(defaults, optimizer="rmsprop"), synthetic, tmp_path)
    assert not (tmp_path / "a" / "m.json").exists()


def test_resume_keeps_the_small_map_paths_it_started_with(defaults, synthetic, tmp_path,
                                                          monkeypatch):
    """The checkpoint carries the measured paths; a resumed run re-applies them even where the
    cache now says otherwise (a new measurement, another machine's cache)."""
    c = cfg(defaults, epochs=2)
    sw = engine.resolve_switches(c["train"], torch.device("cpu"))
    model, _, opt, paths = engine.setup_model("resnet18", c["train"], torch.device("cpu"), sw)
    names = paths["matmul"] + paths["conv"]
    saved = {"matmul": [], "conv": names, "measured": 0, "cached": 19}  # as it started
    (tmp_path / "a").mkdir()
    torch.save({"fingerprint": train.fingerprint(c["train"], synthetic, "resnet18", c["data"]),
                "complete": False, "epoch": 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                "history": [{"epoch": 1, "train_loss": 1.0, "train_acc": 50.0, "test_acc": 50.0,
                             "epoch_time_s": 1.0, "data_wait_s": 0.0, "eval_time_s": 0.1}],
                "small_map_paths": saved}, tmp_path / "a" / "m.ckpt")
    built, real_setup, real_tune = [], engine.setup_model, smallmaps.tune

    def tune_all_matmul(model, *a, **k):  # the cache now says: every layer on the matmul path
        real_tune(model, *a, **k)
        everything = {"matmul": names, "conv": [], "measured": 0, "cached": 19}
        smallmaps.apply_paths(model, everything)
        return everything

    def spy(*a):
        built.append(real_setup(*a))
        return built[-1]
    monkeypatch.setattr(engine, "tune", tune_all_matmul)
    monkeypatch.setattr(engine, "setup_model", spy)
    m = run(c, synthetic, tmp_path)
    assert m["epochs_completed"] == 2 and m["small_map_paths"] == saved
    assert not any(x.matmul for x in built[0][0].modules()
                   if isinstance(x, smallmaps.SmallMapConv2d))


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_only_where_the_cpu_computes_it(defaults, monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: native)
    sw = engine.resolve_switches(cfg(defaults, precision="auto")["train"], torch.device("cpu"))
    assert sw["precision"] == ("bf16" if native else "fp32")
    for fixed in ("fp32", "bf16"):  # an explicit choice is kept on any CPU
        sw = engine.resolve_switches(cfg(defaults, precision=fixed)["train"],
                                     torch.device("cpu"))
        assert sw["precision"] == fixed


def test_tune_under_bf16_measures_its_own_entries(tmp_path):
    """A bf16 run times its layers under autocast, as it trains: its own cache entries."""
    fp32 = smallmaps.tune(smallmaps.fast_small_maps(models.build("resnet18")), (8, 1, 28, 28),
                          cache=str(tmp_path), reps=1)
    bf16 = smallmaps.tune(smallmaps.fast_small_maps(models.build("resnet18")), (8, 1, 28, 28),
                          cache=str(tmp_path), reps=1, amp=True)
    assert bf16["measured"] == fp32["measured"] and bf16["cached"] == fp32["cached"]
    (entry,) = json.loads((tmp_path / "smallmaps.json").read_text()).values()
    assert sum(k.startswith("bf16 ") for k in entry["shapes"]) == fp32["measured"]

