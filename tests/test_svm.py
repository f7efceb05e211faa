"""svm stage: backend agreement, accuracy, gamma='scale', bad input."""
import json

import numpy as np
import pytest
from sklearn.svm import SVC

from ablation.core.cli import UserError
from ablation.stages import svm
from ablation.training import datasets, params, svc


@pytest.fixture
def cfg(defaults):
    return lambda **over: {**defaults["svm"], **over}


def test_gamma_scale_matches_scikit_learn():
    X = np.random.default_rng(0).random((50, 784), dtype=np.float32)
    clf = SVC(gamma="scale").fit(X, np.arange(50) % 3)
    assert svc.resolve_gamma("scale", X) == pytest.approx(clf._gamma, rel=1e-12)
    assert svc.resolve_gamma("auto", X) == pytest.approx(1 / 784)


@pytest.mark.parametrize("kind", ["rbf", "poly"])
def test_backends_agree_on_real_subset(cfg, prepared, kind):
    """1,000 train / 1,000 test MNIST images: gram predictions equal libsvm's on >= 99.9 % (two
    fits: a near-tie may fall either way); our one-vs-one vote from libsvm's own saved model
    equals libsvm's predict on every image."""
    d = datasets.load_prepared(prepared["mnist"])
    idx = svc.subset(60000, 1000, 0)
    X, y = svc.features(d["train_images"][idx]), d["train_labels"][idx]
    test = d["test_images"][:1000]
    lib, _, clf = svc.fit(X, y, kind, cfg(), "libsvm")
    gram, _, _ = svc.fit(X, y, kind, cfg(), "gram")
    ref = clf.predict(svc.features(test))
    assert (svc.predict(gram, test) == ref).mean() >= 0.999
    # our one-vs-one vote from the saved attributes reproduces libsvm's own predict
    assert (svc.predict(lib, test) == ref).all()
    assert gram["n_support"].sum() == pytest.approx(lib["n_support"].sum(), rel=0.01)


@pytest.mark.parametrize("backend", ["gram", "libsvm"])
def test_stage_fits_synthetic_and_saved_model_predicts(cfg, synthetic, tmp_path, backend):
    """600 of 640 synthetic images: far above chance (10 %); the saved .npz predicts the same."""
    m = svm.main(cfg(train_samples=600, backend=backend), synthetic, "rbf",
                 str(tmp_path / "m.json"), str(tmp_path / "svm.npz"))
    assert m["test_accuracy"] > 90.0 and m["backend"] == backend and m["train_samples"] == 600
    assert json.loads((tmp_path / "m.json").read_text())["n_support"] == m["n_support"]
    d = datasets.load_prepared(synthetic)
    pred = svc.predict(str(tmp_path / "svm.npz"), d["test_images"])
    assert 100 * (pred == d["test_labels"]).mean() == pytest.approx(m["test_accuracy"])


def test_train_samples_above_the_data_is_an_error(cfg, synthetic, tmp_path):
    with pytest.raises(UserError, match="svm.train_samples = 641: above the 640 training images"):
        svm.main(cfg(train_samples=641), synthetic, "rbf", str(tmp_path / "m.json"),
                 str(tmp_path / "svm.npz"))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_rbf_2000_mnist_samples_above_90_percent(cfg, prepared, tmp_path):
    m = svm.main(cfg(train_samples=2000, backend="gram"), prepared["mnist"], "rbf",
                 str(tmp_path / "m.json"), str(tmp_path / "svm.npz"))
    assert m["test_accuracy"] > 90.0


def test_auto_picks_gram_within_budget_and_libsvm_beyond():
    assert svc.choose_backend("auto", 10000)[0] == "gram"
    assert svc.choose_backend("auto", 10**7)[0] == "libsvm"
    assert svc.choose_backend("libsvm", 10)[0] == "libsvm"


@pytest.mark.parametrize("key,value,expect", [
    ("kernels", ["rbf", "sigmoid"], "rbf, poly"),
    ("kernels", "rbf", "a non-empty list"),
    ("train_samples", 9, "an integer in [10, 60000]"),
    ("train_samples", 60001, "an integer in [10, 60000]"),
    ("C", 0, "a number > 0"),
    ("C", -1.0, "a number > 0"),
    ("gamma", "large", "scale or auto, or a number > 0"),
    ("gamma", 0, "scale or auto, or a number > 0"),
    ("degree", 0, "an integer in [1, 10]"),
    ("backend", "cuml", "one of auto, libsvm, gram"),
    ("seed", 1.5, "an integer in [0, 4294967295]"),
])
def test_bad_svm_params(cfg, key, value, expect):
    with pytest.raises(UserError) as e:
        params.validate({"svm": cfg(**{key: value})}, ["svm"])
    assert f"svm.{key}" in str(e.value) and expect in str(e.value)


def test_unknown_kernel_in_stage(tmp_path, capsys):
    """The command line checks the kernel name (once), before anything is read or created."""
    from ablation.core import cli
    with pytest.raises(SystemExit) as e:
        cli.run(svm._cli, ["--data", "x.npz", "--kernel", "linear", "--metrics",
                           str(tmp_path / "m.json"), "--out", str(tmp_path / "m.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'linear'" in err
    assert "rbf" in err and "poly" in err
    assert not any(tmp_path.iterdir())
