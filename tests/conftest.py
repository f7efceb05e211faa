import copy
import os

import numpy as np
import pytest

from ablation import params, prepare
from ablation.datasets import DATASETS, FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = os.path.join(ROOT, params.PARAMS_FILE)


def _mirror_or_skip():
    """$DATA_MIRROR with real IDX files; skip without it, but fail under CI=true."""
    m = os.environ.get("DATA_MIRROR")
    ok = m and all(prepare.find_raw(f, [os.path.join(m, d)]) for d in DATASETS
                   for f, _ in FILES.values())
    if not ok:
        msg = f"real data needed: DATA_MIRROR={m!r} lacks the IDX files of {', '.join(DATASETS)}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return m


@pytest.fixture(scope="session")
def mirror():
    return _mirror_or_skip()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Paths of the real prepared .npz of each dataset, made once per test session."""
    m = _mirror_or_skip()
    d = tmp_path_factory.mktemp("prepared")
    out = {}
    for name in DATASETS:
        out[name] = str(d / f"{name}.npz")
        prepare.main(name, out[name], raw_dir=str(d / "raw"), mirror=m)
    return out


SYNTH_CLASSES = [f"c{i}" for i in range(10)]


def synthetic_arrays(n_train=640, n_test=200, seed=0):
    """Ten classes of 28x28 uint8 images a small model learns within one epoch.

    Each class is a fixed random 7x7 pattern blown up to 28x28 (4x4 blocks), drawn at 0-200;
    every image is its class pattern shifted by up to 2 pixels, plus Gaussian noise (sd 40).
    Labels are balanced and shuffled. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    templates = np.kron(rng.random((10, 7, 7)), np.ones((4, 4))) * 200.0

    def split(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = np.empty((n, 28, 28))
        for i, c in enumerate(y):
            x[i] = np.roll(templates[c], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        x += rng.normal(0.0, 40.0, x.shape)
        return np.clip(x, 0, 255).round().astype(np.uint8), y.astype(np.uint8)

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return {"train_images": xtr, "train_labels": ytr, "test_images": xte, "test_labels": yte}


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Path of a synthetic prepared dataset (written by prepare.save): no mirror needed."""
    path = str(tmp_path_factory.mktemp("synthetic") / "synthetic.npz")
    prepare.save(path, synthetic_arrays(), SYNTH_CLASSES)
    return path


@pytest.fixture(scope="session")
def _defaults():
    return params.load(["data", "train", "svm"], PARAMS)


@pytest.fixture
def defaults(_defaults):
    """params.yaml's validated sections, read once per session; each test gets its own copy."""
    return copy.deepcopy(_defaults)
