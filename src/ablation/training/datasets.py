"""What each dataset is (its IDX files, their SHA-256 digests (decompressed), sizes, image
shape, classes), and the prepared format: one .npz per dataset, written by `save_prepared`,
read and checked by `load_prepared`.

Digests and class counts are those of ../shared/datasets/README.md (the original releases).
"""
import os

import numpy as np

from ablation.core.cli import UserError
from ablation.core.io import save_npz

RAW_DIR = os.path.join("data", "raw")  # raw IDX files found or downloaded; not a DVC output
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"
MAX_SIDE = 1024  # pixels: a prepared file with larger images is not one of ours

# split -> (IDX file name, kind); kind is "images" (idx3, N x H x W) or "labels" (idx1, N)
FILES = {
    "train_images": ("train-images-idx3-ubyte", "images"),
    "train_labels": ("train-labels-idx1-ubyte", "labels"),
    "test_images": ("t10k-images-idx3-ubyte", "images"),
    "test_labels": ("t10k-labels-idx1-ubyte", "labels"),
}

DATASETS = {
    "mnist": {
        "sha256": {
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        "sizes": {"train": 60000, "test": 10000},
        "shape": (28, 28),
        "classes": [str(i) for i in range(10)],
        "torchvision": "MNIST",
    },
    "fashion_mnist": {
        "sha256": {
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        "sizes": {"train": 60000, "test": 10000},
        "shape": (28, 28),
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "torchvision": "FashionMNIST",
    },
}


def save_prepared(out, arrays, classes):
    """Write a prepared dataset atomically; return the training pixels' (mean, std) in [0, 1].

    arrays: train_images/test_images uint8 (N, H, W), train_labels/test_labels uint8 (N,);
    classes: the class names, index = label. The one writer of the format `load_prepared`
    reads.
    """
    x = arrays["train_images"].astype(np.float64) / 255.0
    mean, std = float(x.mean()), float(x.std())

    save_npz({**{k: arrays[k] for k in FILES}, "mean": np.float32(mean),
              "std": np.float32(std), "classes": np.array(classes)}, out)
    return mean, std


def load_prepared(path):
    """The prepared arrays of one dataset as a dict (no pickles), checked: the arrays
    `save_prepared` writes, uint8 images (N, H, W) with as many labels, labels within the classes,
    a finite mean and a positive std. Anything else is a UserError naming the file and what is
    wrong."""
    def bad(what):
        raise UserError(f"{path}: not a prepared dataset: {what} (make it with "
                        f"`dvc repro prepare` or `python -m ablation.stages.prepare`)")
    if not os.path.isfile(path):
        if os.path.exists(path):
            bad("not a regular file")
        raise UserError(f"{path}: prepared data not found (run `dvc repro prepare`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*FILES, "mean", "std", "classes") if k not in z.files]
            if missing:
                bad(f"missing array(s) {', '.join(missing)}")
            d = {k: z[k] for k in (*FILES, "mean", "std", "classes")}
    except UserError:
        raise
    except Exception as e:  # zero bytes, truncated, random: BadZipFile, OSError, ValueError...
        bad(f"unreadable ({type(e).__name__})")
    classes = d["classes"]
    if classes.ndim != 1 or classes.dtype.kind != "U" or not 2 <= len(classes) <= 1000:
        bad("'classes' must be 2 to 1000 class names")
    for split in ("train", "test"):
        x, y = d[f"{split}_images"], d[f"{split}_labels"]
        side = d["train_images"].shape[1:]  # the test images must match the training ones
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != side \
                or not all(1 <= s <= MAX_SIDE for s in side):
            bad(f"{split}_images is {x.dtype} {tuple(x.shape)}, expected uint8 (N, H, W) "
                f"with H, W in 1..{MAX_SIDE}, the same for train and test")
        if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != len(x):
            bad(f"{split}_labels is {y.dtype} {tuple(y.shape)}, expected integers "
                f"({len(x)},), one per image")
        if len(y) == 0:
            bad(f"no {split} images")
        if y.min() < 0 or y.max() >= len(classes):
            bad(f"{split}_labels hold {y.min()}..{y.max()}, outside 0..{len(classes) - 1}")
    mean, std = d["mean"], d["std"]
    if mean.shape != () or std.shape != () or not np.isfinite(mean) or not np.isfinite(std) \
            or not 0 < std:
        bad("'mean' and 'std' must be finite numbers, std > 0")
    return d


SUBSET_SEED = 0  # the limits take fixed random subsets, the same for every run's seed


def limited(n, limit, split):
    """Sorted indices of a fixed random subset of `limit` of the split's `n` images (all of
    them where `limit` is None): data.train_limit ("train") and data.test_limit ("test"), the
    same subset for every stage and seed."""
    import numpy as np
    idx = np.arange(n)
    if limit is None or limit >= n:
        return idx
    rng = np.random.default_rng(SUBSET_SEED if split == "train" else [SUBSET_SEED, 1])
    return np.sort(rng.permutation(idx)[:limit])
