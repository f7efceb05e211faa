"""Constants and data makers shared by tests and by hostile_runner.py (which runs outside
pytest); fixtures live in conftest.py."""
import os
import shutil
import subprocess
import sys

import numpy as np

from ablation.training import params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = os.path.join(ROOT, params.PARAMS_FILE)


SYNTH_CLASSES = [f"c{i}" for i in range(10)]
# DVC's memo of what `dvc exp show` collected at each commit (params, metrics), by commit id
EXP_CACHE = os.path.join(".dvc", "tmp", "exps", "cache")
# headless, no network: every host unresolvable, every request through a closed local port
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=10000",
]


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


def warm_exp_cache(repo, cache):
    """Copy `cache` (conftest.exp_cache) into a clone of this repository: its first `dvc exp
    show --all-commits` then reads the commits it shares with this one from DVC's memo instead
    of collecting each anew (36 s of CPU for 217 commits in a fresh clone, 2026-12-08)."""
    shutil.copytree(cache, os.path.join(repo, EXP_CACHE), dirs_exist_ok=True)


def copy_base(base, dest):
    """Copy shrunk_base's repository and remote into `dest` (repo, storage), the copy's
    remote pointed at its own storage: returns (repo, storage)."""
    repo, storage = dest / "repo", dest / "storage"
    shutil.copytree(base[0], repo, symlinks=True)
    shutil.copytree(base[1], storage, symlinks=True)
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "dvc"), "remote", "modify",
                    "--local", "storage", "url", str(storage)], cwd=repo, check=True)
    return repo, storage


def chromium_run(chromium, page, profile, *flags):
    """Headless Chromium (the `chromium` fixture's) on a local page with a fresh profile: its
    stdout (`--dump-dom`: the page's DOM after its scripts ran)."""
    r = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags,
                        page.as_uri()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def dump_dom(chromium, page, profile, *flags):
    """The page's DOM after its scripts ran (and its `load` event, within the virtual time)."""
    dom = chromium_run(chromium, page, profile, "--dump-dom", *flags)
    assert "</html>" in dom, dom[-3000:]
    return dom
