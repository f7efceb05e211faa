"""prepare stage: raw IDX files -> verified uint8 arrays in one .npz per dataset.

Raw files come from, in order: data/raw/<dataset>/, $DATA_MIRROR/<dataset>/, (Fashion-MNIST)
Debian's /usr/share/datasets/fashion-mnist/, torchvision's download of the official mirrors
(into data/raw/<dataset>/). Gzipped or plain, each file's
decompressed content must match the published SHA-256 and its IDX header must be sane.

    python -m ablation.stages.prepare mnist data/prepared/mnist.npz
"""
import gzip
import hashlib
import os
import struct
import tempfile
import zlib

import numpy as np

from ablation.core.cli import Parser, UserError, lookup, progress_bar, run
from ablation.core.io import check_outputs
from ablation.training.datasets import DATASETS, DEBIAN_FASHION, FILES, RAW_DIR, save_prepared

MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # ubyte data, 3 or 1 dimensions


def read_bytes(path):
    """File content, gunzipped if it starts with the gzip magic (whatever its name)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise UserError(f"{path}: corrupt or truncated gzip file ({e}); "
                            f"delete it or replace it with a good copy") from None
    return data


def parse_idx(data, kind, count, shape, path):
    """Check an IDX header (magic, count, image `shape`) and return the array it describes."""
    ndim = 3 if kind == "images" else 1
    hlen = 4 + 4 * ndim
    if len(data) < hlen:
        raise UserError(f"{path}: truncated IDX file: {len(data)} bytes, "
                        f"shorter than its {hlen}-byte header")
    magic, *dims = struct.unpack(f">{1 + ndim}I", data[:hlen])
    if magic != MAGIC[kind]:
        raise UserError(f"{path}: wrong IDX magic number 0x{magic:08x}, expected "
                        f"0x{MAGIC[kind]:08x} ({kind}, ubyte, {ndim} dimensions)")
    want = [count, *shape][:ndim]
    if dims != want:
        raise UserError(f"{path}: IDX header gives dimensions {'x'.join(map(str, dims))}, "
                        f"expected {'x'.join(map(str, want))}")
    size = hlen + int(np.prod(want))
    if len(data) != size:
        raise UserError(f"{path}: IDX body holds {len(data)} bytes, header implies {size} "
                        f"({'truncated' if len(data) < size else 'trailing bytes'})")
    return np.frombuffer(data, dtype=np.uint8, offset=hlen).reshape(want)


def load_verified(path, kind, count, shape, sha256):
    """Read one IDX file, check header and SHA-256 of the decompressed content."""
    data = read_bytes(path)
    arr = parse_idx(data, kind, count, shape, path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise UserError(f"{path}: SHA-256 of decompressed content is {digest}, expected "
                        f"{sha256} (corrupted file; delete it or replace it with a good copy)")
    return arr


def find_raw(fname, dirs):
    """First existing <dir>/<fname>[.gz] over `dirs`, or None."""
    for d in dirs:
        for name in (fname, fname + ".gz"):
            p = os.path.join(d, name)
            if os.path.isfile(p):
                return p
    return None


def download(dataset, raw_dir, missing):
    """Fetch the `missing` IDX files (gzipped) with torchvision's mirror list into
    raw_dir/<dataset>/; a failed download leaves no file and no new directory behind."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import download_url
    cls = getattr(tvd, DATASETS[dataset]["torchvision"])
    dest = os.path.join(raw_dir, dataset)
    made = [d for d in (raw_dir, dest) if not os.path.isdir(d)]
    os.makedirs(dest, exist_ok=True)
    for fname, md5 in cls.resources:
        if fname.removesuffix(".gz") not in missing:
            continue
        errors = []
        for mirror in cls.mirrors:
            with tempfile.TemporaryDirectory(dir=dest) as tmp:  # no half-downloaded file
                try:
                    download_url(mirror + fname, root=tmp, filename=fname, md5=md5)
                    os.replace(os.path.join(tmp, fname), os.path.join(dest, fname))
                    break
                except Exception as e:  # network errors come in many types
                    errors.append(f"{mirror}: {type(e).__name__}")
        else:
            for d in reversed(made):  # directories this call made, if still empty
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise UserError(
                f"no local copy of {dataset} file {fname.removesuffix('.gz')} in "
                f"{os.path.join(raw_dir, dataset)} or $DATA_MIRROR/{dataset}, and the "
                f"download failed, no network? ({'; '.join(errors)[:200]}). Offline sources: set "
                f"DATA_MIRROR to a directory laid out as <mirror>/{dataset}/{fname} (for "
                f"example ../shared/datasets), or for Fashion-MNIST install Debian's "
                f"dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), "
                f"which this stage reads from {DEBIAN_FASHION}.")


def main(dataset, out, raw_dir=RAW_DIR, mirror=None):
    """Prepare `dataset` into the .npz at `out`; return a summary dict."""
    spec = lookup(DATASETS, dataset, "dataset")
    mirror = os.environ.get("DATA_MIRROR") if mirror is None else mirror
    if mirror and not os.path.isdir(mirror):
        raise UserError(f"DATA_MIRROR={mirror}: not a directory")
    dirs = [os.path.join(raw_dir, dataset)] + ([os.path.join(mirror, dataset)] if mirror else [])
    if dataset == "fashion_mnist":
        dirs.append(DEBIAN_FASHION)  # Debian's dataset-fashion-mnist package, if installed
    check_outputs(out)
    paths = {k: find_raw(fname, dirs) for k, (fname, _) in FILES.items()}
    missing = [FILES[k][0] for k, p in paths.items() if p is None]
    if missing:
        download(dataset, raw_dir, missing)
        paths = {k: p or find_raw(FILES[k][0], dirs[:1]) for k, p in paths.items()}
    where = ", ".join(sorted({os.path.dirname(p) for p in paths.values()}))
    print(f"prepare {dataset}: verifying {len(paths)} IDX files in {where}", flush=True)
    arrays, bar = {}, progress_bar(len(FILES), f"prepare {dataset}: verify", unit="file")
    for key, (fname, kind) in FILES.items():
        count = spec["sizes"][key.split("_")[0]]
        arrays[key] = load_verified(paths[key], kind, count, spec["shape"], spec["sha256"][key])
        bar.update(1)
    bar.close()
    for split in ("train", "test"):
        bad = arrays[f"{split}_labels"].max()
        if bad >= len(spec["classes"]):
            raise UserError(f"{paths[split + '_labels']}: label {bad} out of range "
                            f"0..{len(spec['classes']) - 1}")
    mean, std = save_prepared(out, arrays, spec["classes"])
    summary = {"dataset": dataset, "train": len(arrays["train_labels"]),
               "test": len(arrays["test_labels"]), "mean": mean, "std": std,
               "sources": sorted({os.path.dirname(p) for p in paths.values()})}
    print(f"prepare {dataset}: {summary['train']} train / {summary['test']} test images, "
          f"mean {mean:.4f} std {std:.4f}, verified from {', '.join(summary['sources'])}")
    return summary


def _cli(argv):
    ap = Parser(prog="python -m ablation.stages.prepare",
                description="Verify a dataset's IDX files (SHA-256, headers) and write them as "
                            "one .npz (dvc.yaml's prepare stage). Raw files come from "
                            "data/raw/<dataset>/, $DATA_MIRROR/<dataset>/, Debian's "
                            "dataset-fashion-mnist, or torchvision's download.")
    ap.add_argument("dataset", choices=list(DATASETS), help="%(choices)s")
    ap.add_argument("out", help="the .npz to write")
    a = ap.parse_args(argv)
    main(a.dataset, a.out)


if __name__ == "__main__":
    run(_cli)
