"""prepare: IDX parsing and verification on synthetic files; real-data checks on the mirror."""
import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ablation.core import cli
from ablation.core.cli import UserError
from ablation.stages import prepare
from ablation.training import datasets

from .helpers import ROOT

N_TRAIN, N_TEST = 50, 20


def idx_bytes(arr, magic=None):
    magic = magic or (0x803 if arr.ndim == 3 else 0x801)
    return struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A synthetic dataset 'tiny' registered like the real ones, its files in raw/tiny/."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28)),
        "train_labels": np.arange(N_TRAIN) % 10,
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28)),
        "test_labels": np.arange(N_TEST) % 10,
    }
    raw = tmp_path / "raw" / "tiny"
    raw.mkdir(parents=True)
    sha = {}
    for i, (key, (fname, _)) in enumerate(datasets.FILES.items()):
        data = idx_bytes(arrays[key])
        sha[key] = hashlib.sha256(data).hexdigest()
        if i % 2:  # half gzipped, half plain: both must be accepted
            (raw / (fname + ".gz")).write_bytes(gzip.compress(data))
        else:
            (raw / fname).write_bytes(data)
    spec = {"sha256": sha, "sizes": {"train": N_TRAIN, "test": N_TEST}, "shape": (28, 28),
            "classes": [f"c{i}" for i in range(10)], "torchvision": "MNIST"}
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    return {"arrays": arrays, "raw": raw, "root": tmp_path}


def run_tiny(tiny, **kw):
    out = tiny["root"] / "out" / "tiny.npz"
    prepare.main("tiny", str(out), raw_dir=str(tiny["root"] / "raw"), **kw)
    return out


def test_synthetic_roundtrip_gz_and_plain(tiny):
    out = run_tiny(tiny)
    got = datasets.load_prepared(out)
    for key, arr in tiny["arrays"].items():
        assert got[key].dtype == np.uint8
        np.testing.assert_array_equal(got[key], arr)
    x = tiny["arrays"]["train_images"] / 255.0
    assert got["mean"] == pytest.approx(x.mean(), rel=1e-6)
    assert got["std"] == pytest.approx(x.std(), rel=1e-6)
    assert list(got["classes"]) == [f"c{i}" for i in range(10)]
    assert os.listdir(out.parent) == ["tiny.npz"]  # no temp file left


def test_mirror_layout_is_read(tiny, tmp_path):
    mirror = tmp_path / "mirror"
    tiny["raw"].rename(tmp_path / "moved")
    (mirror).mkdir()
    (tmp_path / "moved").rename(mirror / "tiny")
    out = run_tiny(tiny, mirror=str(mirror))
    np.testing.assert_array_equal(datasets.load_prepared(out)["test_labels"],
                                  tiny["arrays"]["test_labels"])


def corrupt(path, how):
    data = path.read_bytes()
    if path.suffix == ".gz":
        if how == "truncate":
            path.write_bytes(data[: len(data) // 2])
            return
        data = gzip.decompress(data)
    if how == "truncate":
        data = data[:-100]
    elif how == "flip":
        data = data[:-1] + bytes([data[-1] ^ 0xFF])
    elif how == "magic":
        data = struct.pack(">I", 0x0000_0900) + data[4:]
    elif how == "count":
        data = data[:4] + struct.pack(">I", 7) + data[8:]
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("fname,how,expect", [
    ("train-images-idx3-ubyte", "truncate", "truncated"),
    ("train-labels-idx1-ubyte.gz", "truncate", "corrupt or truncated gzip"),
    ("t10k-images-idx3-ubyte", "flip", "SHA-256 of decompressed content is"),
    ("t10k-labels-idx1-ubyte.gz", "flip", "SHA-256 of decompressed content is"),
    ("train-images-idx3-ubyte", "magic", "wrong IDX magic number 0x00000900, expected 0x00000803"),
    ("t10k-labels-idx1-ubyte.gz", "count", "dimensions 7, expected 20"),
])
def test_bad_file_named_and_nothing_written(tiny, fname, how, expect):
    corrupt(tiny["raw"] / fname, how)
    with pytest.raises(UserError) as e:
        run_tiny(tiny)
    msg = str(e.value)
    assert expect in msg and fname in msg
    if how == "flip":  # both digests named
        assert datasets.DATASETS["tiny"]["sha256"]["test_" + fname.split("-")[1]] in msg
    assert not (tiny["root"] / "out").exists() or not os.listdir(tiny["root"] / "out")


def test_unknown_dataset_lists_valid(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(prepare._cli, ["cifar10", "x.npz"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'cifar10'" in err
    assert "mnist" in err and "fashion_mnist" in err  # the valid ones (quoted or not)


def test_no_data_no_network_names_offline_sources(tiny, monkeypatch):
    (tiny["raw"] / "t10k-images-idx3-ubyte").unlink()

    def offline(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    with pytest.raises(UserError) as e:
        run_tiny(tiny)
    msg = str(e.value)
    assert "DATA_MIRROR" in msg and "dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg and "t10k-images-idx3-ubyte" in msg


def test_cli_corrupt_mirror_file_exit_2_one_line(mirror, tmp_path):
    """A corrupted copy of a real file in data/raw/ wins over the mirror and is reported."""
    raw = tmp_path / "data" / "raw" / "mnist"
    raw.mkdir(parents=True)
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes((Path(mirror) / "mnist" / bad.name).read_bytes())
    corrupt(bad, "flip")
    env = dict(os.environ, DATA_MIRROR=mirror, PYTHONPATH=os.path.join(ROOT, "src"))
    r = subprocess.run([sys.executable, "-m", "ablation.stages.prepare", "mnist",
                        "data/prepared/m.npz"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad.relative_to(tmp_path)) in lines[0], r.stderr
    assert datasets.DATASETS["mnist"]["sha256"]["test_labels"] in lines[0]
    assert not (tmp_path / "data" / "prepared").exists()


# --- real data -------------------------------------------------------------------------------

CLASS_COUNTS = {  # published, ../shared/datasets/README.md
    "mnist": {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
              "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]},
    "fashion_mnist": {"train": [6000] * 10, "test": [1000] * 10},
}
FIRST_LABELS = {"mnist": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
                "fashion_mnist": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]}
MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}  # widely quoted


@pytest.mark.parametrize("name", list(datasets.DATASETS))
def test_real_prepared_arrays(prepared, name):
    z = datasets.load_prepared(prepared[name])
    assert z["train_images"].shape == (60000, 28, 28) and z["train_images"].dtype == np.uint8
    assert z["test_images"].shape == (10000, 28, 28) and z["test_images"].dtype == np.uint8
    assert z["train_labels"].shape == (60000,) and z["test_labels"].shape == (10000,)
    for split in ("train", "test"):
        counts = np.bincount(z[f"{split}_labels"], minlength=10).tolist()
        assert counts == CLASS_COUNTS[name][split]
    assert z["train_labels"][:10].tolist() == FIRST_LABELS[name]
    assert (float(z["mean"]), float(z["std"])) == pytest.approx(MEAN_STD[name], abs=5e-4)
    assert list(z["classes"]) == datasets.DATASETS[name]["classes"]


def test_missing_file_in_a_mirror_names_it_and_leaves_no_directories(tiny, tmp_path, monkeypatch):
    """Three of four files in the mirror: the message names the missing one, and the failed
    download leaves no empty data/raw directories behind."""
    mirror = tmp_path / "mirror"
    tiny["raw"].rename(tmp_path / "tinyfiles")
    (mirror).mkdir()
    (tmp_path / "tinyfiles").rename(mirror / "tiny")
    (mirror / "tiny" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setattr("torchvision.datasets.utils.download_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    raw = tmp_path / "fresh" / "raw"
    with pytest.raises(UserError, match="file t10k-labels-idx1-ubyte in") as e:
        prepare.main("tiny", str(tmp_path / "out" / "tiny.npz"), raw_dir=str(raw),
                     mirror=str(mirror))
    assert "t10k-images" not in str(e.value)
    assert not (tmp_path / "fresh" / "raw").exists() and not (tmp_path / "out").exists()
