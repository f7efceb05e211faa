import copy
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from ablation.record import dvc as D
from ablation.stages import prepare
from ablation.training import params
from ablation.training.datasets import DATASETS, FILES, save_prepared

from .helpers import EXP_CACHE, PARAMS, ROOT, SYNTH_CLASSES, synthetic_arrays, warm_exp_cache


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


def pytest_collection_modifyitems(items):
    """The files with the most `slow` tests first, the rest in file order: `make test`'s
    workers (pytest-xdist, whole files each, `--no-loadscope-reorder`) take the longest files
    first and the short ones fill in behind them, instead of the long ones coming last."""
    def slow(item):
        return item.get_closest_marker("slow") is not None
    by_file = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    order = sorted(by_file.values(), key=lambda group: -sum(map(slow, group)))
    items[:] = [item for group in order for item in group]


@pytest.fixture(scope="session", autouse=True)
def _cores_pool(tmp_path_factory):
    """Under parallel workers each worker's runs hold cores of a pool of its own, not the
    machine's (core/cores.py): in one pool a run asking for every core starves while the other
    worker's runs hold one after another. Busy threads may then reach twice the cores; no test
    asserts a speed, some bound how long a wait or a kill may take (1 s for a free core to 600 s
    for a grid run). Serially the suite's runs share the machine's pool."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or "ABLATION_CORES_DIR" in os.environ:
        yield
        return
    os.environ["ABLATION_CORES_DIR"] = str(tmp_path_factory.mktemp("cores"))
    yield
    del os.environ["ABLATION_CORES_DIR"]


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
def exp_cache(tmp_path_factory):
    """DVC's experiment cache of a plain clone of this repository after one `dvc exp show
    --all-commits` (what every commit holds, by commit id), made once a session: the tests'
    clones copy it in (helpers.warm_exp_cache), so each does not spend half a minute of CPU
    collecting the same few hundred commits again."""
    repo = tmp_path_factory.mktemp("exp-cache") / "repo"
    subprocess.run(["git", "clone", "-q", ROOT, str(repo)], check=True)
    r = D.dvc(["exp", "show", "--json", "--all-commits"], cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(repo / EXP_CACHE)


@pytest.fixture(scope="session")
def shrunk_base(tmp_path_factory, mirror, exp_cache):
    """(repo, storage): a clone of this repository whose committed base is shrunk (MNIST only,
    200 training and 500 test images, one epoch, one thread, the RBF SVM on 100 samples),
    every stage run and pushed to `storage`, a local DVC remote, as `make run` leaves them.
    Made once a session; the grid tests copy it (tests/test_cluster.py `clone`)."""
    root = tmp_path_factory.mktemp("shrunk-base")
    repo, storage = root / "repo", root / "storage"
    env = dict(os.environ, DATA_MIRROR=mirror,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    def sh(*cmd, cwd=repo):
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])

    sh("git", "clone", "-q", ROOT, str(repo), cwd=root)
    warm_exp_cache(repo, exp_cache)  # every copy of the base inherits it
    sh("dvc", "remote", "modify", "--local", "storage", "url", str(storage))
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"].update(datasets=["mnist"], train_limit=200, test_limit=500)
    p["train"].update(epochs=1, device="cpu", threads=1)
    p["svm"].update(kernels=["rbf"], train_samples=100)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh("dvc", "repro", "--pull")
    sh("dvc", "push")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "shrunk base")
    return repo, storage


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


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium's path ($CHROMIUM or on PATH); skip without it, but fail under
    CI=true (tests/browser/ensure_chromium.sh installs it)."""
    path = (os.environ.get("CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))
    if not path:
        msg = "chromium not found: run tests/browser/ensure_chromium.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
