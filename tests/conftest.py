import os

import pytest

from ablation import prepare
from ablation.datasets import DATASETS, FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
