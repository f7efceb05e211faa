"""A CPU fast path for the tiny feature maps of ResNets on 28x28 images.

At 28x28 input with the ImageNet stem, layer3 runs on 2x2 and layer4 on 1x1 maps. oneDNN's
3x3 convolution takes a slow path there (about 35 ms forward+backward for one 512-channel conv
at batch 16, where the arithmetic needs about 1 ms). On such maps the convolution is exactly a
matrix multiply: on a 1x1 output only the taps that overlap the input contribute, and on up to
2x2 outputs an unfold + matrix multiply computes the same sums. `fast_small_maps` switches the
3x3 convolutions to that path; parameters and state_dict keys stay torchvision's.
"""
import torch.nn as nn
import torch.nn.functional as F

SMALL_OUT = 4  # output pixels (Ho * Wo) at or below which the matmul path runs


def _taps(size, k, stride, pad, out):
    """Range [lo, hi) of kernel taps along one axis that ever overlap the input."""
    used = [i for i in range(k) if any(0 <= o * stride - pad + i < size for o in range(out))]
    return used[0], used[-1] + 1


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d whose forward is a matrix multiply when the output map is tiny."""

    def forward(self, x):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho * wo > SMALL_OUT or self.groups != 1 or self.dilation != (1, 1) \
                or self.padding_mode != "zeros":
            return super().forward(x)
        if ho == 1 and wo == 1:  # only the overlapping taps see data: crop, then matmul
            i0, i1 = _taps(h, kh, sh, ph, 1)
            j0, j1 = _taps(w, kw, sw, pw, 1)
            xs = x[:, :, i0 - ph:i1 - ph, j0 - pw:j1 - pw].reshape(n, -1)
            ws = self.weight[:, :, i0:i1, j0:j1].reshape(self.out_channels, -1)
            y = (xs @ ws.t()).reshape(n, self.out_channels, 1, 1)
        elif (kh, kw, ph, pw) == (1, 1, 0, 0):  # 1x1: pick the strided pixels, then matmul
            xs = x[:, :, ::sh, ::sw].permute(0, 2, 3, 1).reshape(n * ho * wo, c)
            y = (xs @ self.weight.reshape(self.out_channels, c).t()).reshape(
                n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        else:  # (O, C*kh*kw) weights times (N, C*kh*kw, L) columns
            cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
            y = (self.weight.reshape(self.out_channels, -1) @ cols).reshape(
                n, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y


def fast_small_maps(model):
    """Switch every 3x3 and 1x1 convolution of `model` to SmallMapConv2d in place.

    Parameters stay the same objects, so state_dict keys and optimizer state are unchanged.
    """
    for m in model.modules():
        if type(m) is nn.Conv2d and m.kernel_size in ((3, 3), (1, 1)):
            m.__class__ = SmallMapConv2d
    return model
