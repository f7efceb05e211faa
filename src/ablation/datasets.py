"""What each dataset is: its IDX files, their SHA-256 digests (decompressed), sizes, classes.

Digests and class counts are those of ../shared/datasets/README.md (the original releases).
"""
import os

RAW_DIR = os.path.join("data", "raw")  # raw IDX files found or downloaded; not a DVC output
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"

# split -> (IDX file name, kind); kind is "images" (idx3, N x 28 x 28) or "labels" (idx1, N)
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
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "torchvision": "FashionMNIST",
    },
}
