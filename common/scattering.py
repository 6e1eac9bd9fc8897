"""kymatio's 2D wavelet scattering transform as plain tensor operations, so it exports.

kymatio computes the transform with FFTs on complex tensors and a custom autograd function,
which neither TorchScript nor ONNX captures. The same transform is a handful of circular
convolutions: every step of kymatio's algorithm multiplies a Fourier transform by a filter
(a circular convolution by the filter's inverse transform), subsamples in the Fourier
domain (spatial subsampling: a strided convolution), takes a complex modulus or a real part.
`Scattering2D` builds kymatio's own filter bank once, turns each filter into a spatial
kernel, and applies them with `conv2d` on a circularly padded input, real and imaginary
parts as separate output channels: real tensors and standard operators only.

It is the exported, served form of the transform. Full-size kernels keep it equal to
kymatio to float rounding, at a cost: several times kymatio's FFTs over a whole data set,
so training computes its features with kymatio (`common.model.ScatterNet.fixed_input`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _kernels(shape: tuple[int, int], J: int, L: int) -> tuple[tuple[int, int, int, int], dict[str, torch.Tensor]]:
    """kymatio's padding and filters as flipped spatial conv2d weights, built once per process.

    `phi-<r>`: the low-pass filter at resolution r (1, 1, k, k); `psi-<j>-<r>`: the L
    wavelets of scale j at resolution r, real parts then imaginary parts (2L, 1, k, k).
    """
    from kymatio.scattering2d.filter_bank import filter_bank
    from kymatio.scattering2d.utils import compute_padding

    height, width = shape
    padded_height, padded_width = compute_padding(height, width, J)
    # As kymatio's `Pad`: (left, right, top, bottom), an odd extra pixel on the right / bottom.
    padding = (
        (padded_width - width) // 2,
        (padded_width - width + 1) // 2,
        (padded_height - height) // 2,
        (padded_height - height + 1) // 2,
    )
    filters = filter_bank(padded_height, padded_width, J, L)
    kernels = {
        f"phi-{r}": _spatial(level).real.unsqueeze(0).unsqueeze(0)
        for r, level in enumerate(filters["phi"]["levels"])
    }
    for j in range(J):
        wavelets = [psi for psi in filters["psi"] if psi["j"] == j]
        for r in range(len(wavelets[0]["levels"])):
            spatial = [_spatial(psi["levels"][r]) for psi in wavelets]
            kernels[f"psi-{j}-{r}"] = torch.stack([k.real for k in spatial] + [k.imag for k in spatial]).unsqueeze(1)
    return padding, kernels


def _spatial(fourier: np.ndarray) -> torch.Tensor:
    """A Fourier-domain filter as the spatial kernel of the same circular convolution, flipped
    because `conv2d` cross-correlates (see `_circular_conv`)."""
    kernel = torch.fft.ifft2(torch.from_numpy(np.asarray(fourier, dtype=np.complex128)))
    return torch.flip(kernel, dims=(-2, -1)).to(torch.complex64)


def _circular_conv(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Circular convolution of every channel of `x` (B, C, h, w) with `weight` (K, 1, h, w): (B, C * K, h / stride, w / stride).

    Padding the start of each axis of length n with its last n - 1 values makes output i of a
    valid cross-correlation read inputs i - (n - 1) ... i modulo n: with the flipped kernel,
    the circular convolution, subsampled by `stride`.
    """
    batch, channels, height, width = x.shape
    wrapped = F.pad(
        x.reshape(batch * channels, 1, height, width), (weight.shape[-1] - 1, 0, weight.shape[-2] - 1, 0), mode="circular"
    )
    out = F.conv2d(wrapped, weight, stride=stride)
    return out.reshape(batch, channels * weight.shape[0], out.shape[-2], out.shape[-1])


class Scattering2D(nn.Module):
    """The scattering coefficients of kymatio's `Scattering2D(J, shape, L)`, orders 0 to 2, as (B, C, h, w).

    C = 1 + J L + L^2 J (J - 1) / 2 channels in kymatio's order (order 0, then order 1 by
    (j1, theta1), then order 2 by (j1, theta1, j2, theta2)); h, w = shape / 2^J. The filters
    are buffers outside `state_dict` (`persistent=False`): they are fixed, every party builds
    the same ones, and exports carry them as constants.
    """

    def __init__(self, shape: tuple[int, int] = (28, 28), J: int = 2, L: int = 8) -> None:
        super().__init__()
        self.J, self.L = J, L
        self.padding, kernels = _kernels(tuple(shape), J, L)
        for name, kernel in kernels.items():
            self.register_buffer(name.replace("-", "_"), kernel, persistent=False)

    def _kernel(self, name: str) -> torch.Tensor:
        return self.get_buffer(name)

    def _lowpass(self, u: torch.Tensor, resolution: int) -> torch.Tensor:
        """Average `u` (at scale 2^resolution) down to scale 2^J: the real part, as kymatio's irfft."""
        return _circular_conv(u, self._kernel(f"phi_{resolution}"), stride=2 ** (self.J - resolution))

    def _modulus(self, u: torch.Tensor, j: int, resolution: int) -> torch.Tensor:
        """|u * psi| for the L wavelets of scale 2^j, from `u` at scale 2^resolution to scale 2^j."""
        out = _circular_conv(u, self._kernel(f"psi_{j}_{resolution}"), stride=2 ** (j - resolution))
        batch, _, height, width = out.shape
        parts = out.reshape(batch, -1, 2, self.L, height, width)  # (input channel, re/im, theta)
        return torch.sqrt(parts[:, :, 0] ** 2 + parts[:, :, 1] ** 2).reshape(batch, -1, height, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.pad(images, self.padding, mode="reflect")
        first, second = [], []
        for j1 in range(self.J):
            u1 = self._modulus(x, j1, 0)  # (B, L, ...)
            first.append(self._lowpass(u1, j1))
            deeper = [self._lowpass(self._modulus(u1, j2, j1), j2) for j2 in range(j1 + 1, self.J)]
            if deeper:
                batch, _, height, width = deeper[0].shape
                # kymatio's order: theta1 outer, then (j2, theta2)
                blocks = [block.reshape(batch, self.L, -1, height, width) for block in deeper]
                second.append(torch.cat(blocks, dim=2).reshape(batch, -1, height, width))
        coefficients = torch.cat([self._lowpass(x, 0), *first, *second], dim=1)
        return coefficients[..., 1:-1, 1:-1]  # kymatio's unpad: one pixel of the padding per side
