"""Fused packs (HFTA): N runs trained as one computation equal each run trained alone."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from ablation.core.cli import UserError
from ablation.gpu import fused
from ablation.training import engine, models, params
from ablation.training.datasets import save_prepared

from .helpers import SYNTH_CLASSES, synthetic_arrays

# Both sides run in float64 (unit roundoff u = 1.1e-16), so the bound holds on any CPU. A
# ResNet-18 dot product sums at most n = 512*3*3 = 4608 terms: a rounding error of about
# sqrt(n) u = 1e-14 relative to the sum of |terms| (n u = 5e-13 at worst, Higham's gamma_n),
# whatever the summation order. BatchNorm over 4 images and 5 steps carry it on; Adam turns a
# gradient's absolute error into at most lr / (4 eps) (<= 1e5 here) times as much, at |g| ~ eps:
# n u x 1e5 = 5e-8 a step at worst, 2.5e-7 over 5 steps. 1e-6 of a tensor's largest magnitude
# holds that on any CPU; a fusion bug (another run's channels, statistics or gradients shared
# across runs) shows at 1e-3 and up. Measured: bitwise equal on a 2-core Intel AVX-512 machine,
# 6e-9 (layer3 of the lr 3e-3 Adam run, step 4) on a 2-core AMD EPYC with AVX-512 bf16.
TOL = 1e-6
STEPS = 5  # the last one with runs 0 and 2 only: run 1 must stay as it was
RUNS = ({"seed": 1, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        {"seed": 2, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
        {"seed": 3, "optimizer": "adam", "lr": 3e-3, "momentum": 0.9, "weight_decay": 0.0})


def close(a, b, what):
    """Norm-wise: max |a - b| <= TOL x max |b| (exact for integers: num_batches_tracked)."""
    if not b.is_floating_point():
        assert torch.equal(a, b), what
        return
    err = (a - b).abs().max().item()
    assert err <= TOL * b.abs().max().item(), f"{what}: differs by {err:.3g}"


def tensors(model, opt):
    """Every state_dict tensor of the model and of its optimizer, by name."""
    out = dict(model.state_dict())
    for k, st in opt.state_dict()["state"].items():
        out.update({f"opt.{k}.{n}": v for n, v in st.items() if torch.is_tensor(v)})
    return out


def _run(cfg, data):
    """A float64 run as engine.setup_model builds it (its seed first), and its shuffle."""
    cfg = {**cfg, "batch_size": 4, "loader": "resident"}
    torch.manual_seed(cfg["seed"])
    model = models.build("resnet18", "imagenet", 10, 1).double()
    x, y = (torch.from_numpy(data[k]) for k in ("train_images", "train_labels"))
    batches = engine.epoch_batches(x, y.long(), cfg, torch.device("cpu"), 0, False)
    x01 = data["train_images"] / 255.0
    ctx = engine.RunContext(torch.device("cpu"), float(x01.mean()), float(x01.std()))
    return model, models.make_optimizer(model, cfg, False), batches, ctx


@pytest.fixture(autouse=True)
def one_thread():
    """Batch-4 and batch-8 steps gain little from threads; one thread spares the OpenMP
    spin-waits that made these tests 4-7x slower where other work shares the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_packed_equals_alone_step_by_step():
    """3 runs (SGD with momentum; Adam at two lrs; two datasets), fused and alone on the same
    batches: logits, losses and every model and optimizer tensor after every step."""
    sets = [synthetic_arrays(n_train=24, n_test=10, seed=s) for s in (0, 1)]
    packed = [_run(cfg, sets[i % 2]) for i, cfg in enumerate(RUNS)]
    alone = []
    for (m, _, _, _), cfg in zip(packed, RUNS):  # the same initial weights, a fresh optimizer
        m = copy.deepcopy(m)
        alone.append((m, models.make_optimizer(m, cfg, False)))
    for s in range(STEPS):
        idx = [0, 1, 2] if s < STEPS - 1 else [0, 2]
        before = {k: v.clone() for k, v in tensors(*packed[1][:2]).items()}
        xbs, ybs = zip(*(next(packed[i][2]) for i in idx))
        ctxs = [packed[i][3] for i in idx]
        x = fused.inputs(list(xbs), torch.tensor([c.mean for c in ctxs]),
                         torch.tensor([c.std for c in ctxs]))
        for j, i in enumerate(idx):  # the fused input holds each run's own normalised images
            assert torch.equal(x[:, j:j + 1], engine.normalise(xbs[j], packed[i][3]))
        losses, out = fused.step([packed[i][0] for i in idx], [packed[i][1] for i in idx],
                                 x.double(), torch.stack(ybs))
        for j, i in enumerate(idx):
            model, opt = alone[i]
            ref = model(x[:, j:j + 1].double())  # as engine.train_one_epoch steps
            loss = F.cross_entropy(ref, ybs[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            close(out[j], ref.detach(), f"step {s} run {i} logits")
            close(losses[j], loss.detach(), f"step {s} run {i} loss")
            mine = tensors(*packed[i][:2])
            theirs = tensors(model, opt)
            assert mine.keys() == theirs.keys()
            for k in theirs:
                close(mine[k], theirs[k], f"step {s} run {i} {k}")
        if 1 not in idx:  # not in this step's group: untouched
            for k, v in tensors(*packed[1][:2]).items():
                assert torch.equal(v, before[k]), f"idle run 1 {k}"
    x = torch.randn(3, 3, 28, 28, dtype=torch.float64)  # eval mode: the running statistics
    for m, _, _, _ in packed:
        m.eval()
    out = fused.forward([m for m, _, _, _ in packed], x)
    for i, (m, _) in enumerate(alone):
        close(out[i], m.eval()(x[:, i:i + 1]), f"eval run {i} logits")


SIZES = (64, 60)  # training images: batches of 8, and 7 of 8 + 1 of 4 (a step of its own)


@pytest.fixture
def pack(defaults, tmp_path):
    """Two tiny prepared datasets (SIZES) and a job maker: job(tag, data index, **overrides)."""
    paths = []
    for s, n in enumerate(SIZES):
        paths.append(str(tmp_path / f"d{s}.npz"))
        save_prepared(paths[-1], synthetic_arrays(n_train=n, n_test=50, seed=s), SYNTH_CLASSES)
    defaults["data"]["train_limit"] = None
    defaults["train"].update({"epochs": 1, "device": "cpu", "loader": "resident",
                              "batch_size": 8, "precision": "fp32", "compile": False})

    def job(tag, data=0, live=False, **over):
        d = tmp_path / tag
        return {"cfg": {**defaults["train"], **over}, "data_cfg": defaults["data"],
                "data_path": paths[data], "model_name": "resnet18",
                "metrics_path": str(d / "m.json"), "model_path": str(d / "m.pt"),
                "live_dir": str(d / "live") if live else None}
    return job


def test_train_pack_writes_each_runs_outputs(pack, tmp_path):
    """3 runs, 1 epoch: each writes train.main's files, recorded as a fused pack of 3; each
    accuracy reported is engine.evaluate's on the saved model; the diverging run stops alone;
    dvclive curves where asked."""
    jobs = [pack("a", 0, seed=0), pack("b", 1, True, seed=1, optimizer="sgd", lr=0.05),
            pack("c", 0, True, seed=2, optimizer="sgd", lr=1e6, momentum=0.9)]
    results = fused.train_pack(jobs)
    for tag, n, (m, hist) in zip("abc", (SIZES[0], SIZES[1], SIZES[0]), results):
        on_disk = json.loads((tmp_path / tag / "m.json").read_text())
        record = json.loads((tmp_path / tag / "m.run.json").read_text())
        assert sorted(on_disk) == sorted(params.METRICS["train"])
        assert sorted(record) == sorted(params.RECORD["train"])
        assert {**on_disk, **record} == json.loads(json.dumps(m))
        assert record["packing"] == "fused" and record["gpu_shared_by"] == 3
        assert record["small_maps"] is False and record["compile_mode"] is None
        assert [h["epoch"] for h in hist] == [1] and m["train_images"] == n
        assert set(hist[0]) == {"epoch", "train_loss", "train_acc", "test_acc", "epoch_time_s",
                                "data_wait_s", "eval_time_s"}
    for tag, (m, hist) in zip("ab", results):
        art = torch.load(tmp_path / tag / "m.pt", weights_only=True)
        model = models.build(art["model"], art["stem"], len(art["classes"]))
        model.load_state_dict(art["state_dict"])
        s = "ab".index(tag)
        data = synthetic_arrays(n_train=SIZES[s], n_test=50, seed=s)
        ctx = engine.RunContext(torch.device("cpu"), art["mean"], art["std"])
        acc, _ = engine.evaluate(model, torch.from_numpy(data["test_images"]),
                                 torch.from_numpy(data["test_labels"]).long(), ctx)
        assert m["diverged"] is False and m["test_accuracy"] == acc == hist[0]["test_acc"]
        assert art["metrics"] == m
    c = results[2][0]
    assert c["diverged"] is True and c["diverged_epoch"] == 1 and c["test_accuracy"] is None
    plots = tmp_path / "b" / "live" / "plots"
    assert (plots / "metrics" / "test" / "accuracy.tsv").read_text().count("\n") == 2
    assert len(json.loads((plots / "sklearn" / "confusion_matrix.json").read_text())) == 50
    cm = tmp_path / "c" / "live" / "plots" / "sklearn" / "confusion_matrix.json"
    assert json.loads(cm.read_text()) == []  # diverged: DVC still finds the file


@pytest.mark.parametrize("over,match", [
    ({"batch_size": 16}, r"train\.batch_size \(8, 16\)"),
    ({"loader": "dataloader"}, r"train\.loader"),
])
def test_mismatched_jobs_are_refused(pack, tmp_path, over, match):
    with pytest.raises(UserError, match=match):
        fused.train_pack([pack("a"), pack("b", **over)])
    assert not (tmp_path / "a").exists()  # refused before any work
