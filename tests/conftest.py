import copy
import os

import pytest

from ablation.stages import prepare
from ablation.training import params
from ablation.training.datasets import DATASETS, FILES, save_prepared

from .helpers import PARAMS, ROOT, SYNTH_CLASSES, synthetic_arrays


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


@pytest.fixture(scope="session", autouse=True)
def _tuning_cache(tmp_path_factory):
    """The small-map path choices measured during the tests go to a temporary cache (shared by
    the processes the tests start), not the user's ~/.cache/ablation."""
    old = os.environ.get("ABLATION_CACHE_DIR")
    os.environ["ABLATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("ablation-cache"))
    yield
    if old is None:
        del os.environ["ABLATION_CACHE_DIR"]
    else:
        os.environ["ABLATION_CACHE_DIR"] = old


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


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Path of a synthetic prepared dataset (written by save_prepared): no mirror needed."""
    path = str(tmp_path_factory.mktemp("synthetic") / "synthetic.npz")
    save_prepared(path, synthetic_arrays(), SYNTH_CLASSES)
    return path


@pytest.fixture(scope="session")
def _defaults():
    return params.load(["data", "train", "svm"], PARAMS)


@pytest.fixture
def defaults(_defaults):
    """params.yaml's validated sections, read once per session; each test gets its own copy."""
    return copy.deepcopy(_defaults)


@pytest.fixture
def root():
    """The repository root (tests run stages and commands there or copy from it)."""
    return ROOT


@pytest.fixture
def params_file(tmp_path, defaults):
    """Write params sections to a temporary params.yaml: `params_file(p) -> path`."""
    import yaml

    def write(p=None, name="params.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(p if p is not None else defaults))
        return str(path)
    return write
