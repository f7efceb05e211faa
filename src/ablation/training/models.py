"""What a run is built from, by name: architectures, stems, optimizers, SVM kernels.

These registries own the names: params.py takes its allowed values from them, and the
builders look a name up with cli.lookup, which names the valid ones for a caller that did not
come through the params schema. Importing this module imports no torch (grid and report
commands read the names); the builders import it when called.
"""
from ablation.core.cli import lookup

# name -> torchvision.models constructor
MODELS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50"}

# name -> the first convolution and whether the max-pool follows it
STEMS = {
    "imagenet": {"kernel_size": 7, "stride": 2, "padding": 3, "maxpool": True},  # the study's
    "cifar": {"kernel_size": 3, "stride": 1, "padding": 1, "maxpool": False},  # 4x the pixels
}

# name -> (torch.optim class, the train.* params it takes besides lr and weight_decay)
OPTIMIZERS = {"sgd": ("SGD", ("momentum",)), "adam": ("Adam", ())}


def _rbf(dot, sq_a, sq_b, gamma, degree, coef0):  # exp(-gamma |a - b|^2)
    return (sq_a[:, None] + sq_b[None, :] - 2.0 * dot).clamp_(min=0.0).mul_(-gamma).exp_()


def _poly(dot, sq_a, sq_b, gamma, degree, coef0):  # (gamma a.b + coef0)^degree
    return (gamma * dot + coef0) ** degree


# name -> kernel from a.b and the squared norms (scikit-learn's definitions)
KERNELS = {"rbf": _rbf, "poly": _poly}


def build(name, stem="imagenet", num_classes=10, in_channels=1):
    """A torchvision ResNet, no downloaded weights, `in_channels` input channels and
    `num_classes` outputs, with the named stem."""
    import torch.nn as nn
    import torchvision
    model = getattr(torchvision.models, lookup(MODELS, name, "model"))(
        weights=None, num_classes=num_classes)
    s = lookup(STEMS, stem, "stem")
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=s["kernel_size"], stride=s["stride"],
                            padding=s["padding"], bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if not s["maxpool"]:
        model.maxpool = nn.Identity()
    return model


def make_optimizer(model, cfg, fused):
    """The optimizer train.optimizer names, with lr, weight_decay and what it takes besides."""
    import torch
    cls, extra = lookup(OPTIMIZERS, cfg["optimizer"], "optimizer")
    return getattr(torch.optim, cls)(model.parameters(), lr=cfg["lr"],
                                     weight_decay=cfg["weight_decay"], fused=fused,
                                     **{k: cfg[k] for k in extra})


def kernel(A, B, kind, gamma, degree=3, coef0=0.0):
    """Kernel matrix K[i, j] = k(A[i], B[j]) in float64, computed in bulk with torch."""
    import torch
    a = torch.as_tensor(A, dtype=torch.float64)
    b = torch.as_tensor(B, dtype=torch.float64)
    formula = lookup(KERNELS, kind, "kernel")
    K = formula(a @ b.T, (a * a).sum(1), (b * b).sum(1), gamma, degree, coef0)
    return K.numpy()


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def gflops(name, stem, shape=(1, 28, 28), num_classes=10):
    """Forward GFLOPs for one image of `shape` (C, H, W) (one multiply-add = 1 flop), eval mode.

    fvcore's count where fvcore is installed. It does not count BatchNorm as 4 operations per
    element, so this is a little below the study's figures (0.0331 vs 0.0332 for ResNet-18).
    Elsewhere (the bare GPU machine) torch's own counter, which also leaves out ReLU: about
    0.5 % lower.
    """
    import warnings

    import torch
    model = build(name, stem, num_classes, shape[0]).eval()
    x = torch.zeros(1, *shape)
    try:
        # fvcore traces with torch.jit, which warns it is deprecated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis
            fca = FlopCountAnalysis(model, x)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return fca.total() / 1e9
    except ImportError:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            model(x)
        return fc.get_total_flops() / 2 / 1e9  # it counts a multiply-add as 2 flops
