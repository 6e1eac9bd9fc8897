"""Opacus-compatible MNIST models.

No BatchNorm: it mixes examples within a batch, which breaks per-sample gradients and so
DP-SGD. Activations are tanh: bounded activations keep activations and gradients small
under clipping, and do better than ReLU under DP-SGD (Papernot et al., "Tempered sigmoid
activations for deep learning with differential privacy", 2021).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.scattering import Scattering2D


class MnistCNN(nn.Module):
    """The small CNN of the DP-SGD MNIST literature: two strided convs and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.Tanh(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@functools.cache
def _kymatio_scattering() -> nn.Module:
    # The 2D frontend is imported directly: `kymatio.torch` also loads the 3D transforms,
    # which need `scipy.special.sph_harm`, gone from current SciPy.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCATTERING_J, shape=(28, 28), L=SCATTERING_L)


SCATTERING_J, SCATTERING_L = 2, 8


class ScatterNet(nn.Module):
    """Fixed ScatterNet features and a trained linear classifier (Tramèr & Boneh, ICLR 2021).

    A wavelet scattering transform (J = 2, L = 8: 81 channels of 7 x 7) has no parameters
    and needs no data, so it costs no privacy; only a GroupNorm'd linear layer (39,700
    weights) is trained. Under DP-SGD that wins twice: hand-crafted features beat what a
    small CNN learns from noisy gradients, and per-sample gradients of one linear layer are
    cheap. The transform's filters are outside `state_dict`, hence off the wire and out of
    Opacus' way: every party builds the same fixed filters. Training computes a shard's
    features once with kymatio's FFTs (`fixed_input`, the faster way over a data set) and
    trains `head` on them; `forward` runs the same transform as plain convolutions
    (`common.scattering`), so the whole model exports to TorchScript and ONNX.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scattering = Scattering2D((28, 28), J=SCATTERING_J, L=SCATTERING_L)
        self.head = nn.Sequential(
            nn.GroupNorm(27, 81, affine=False), nn.Flatten(), nn.Linear(81 * 7 * 7, 10)
        )

    @staticmethod
    @torch.no_grad()
    def fixed_input(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The scattering features of `images` (N, 1, 28, 28) -> (N, 81, 7, 7), by kymatio.

        In batches: the transform's complex intermediates take about 100x the input, so a
        batch of 2000 images peaks near 0.5 GB in every process that computes features.
        """
        scattering = _kymatio_scattering()
        return torch.cat(
            [scattering(images[i : i + batch_size]).flatten(1, 2) for i in range(0, len(images), batch_size)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scattering(x))


MODELS: dict[str, type[nn.Module]] = {"cnn": MnistCNN, "scatnet": ScatterNet}


def split(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The module that training updates, and the fixed transform its inputs go through first (or None).

    Trainers run the transform once over their data and train the module on the result;
    the full model (`model(images)`) is what gets evaluated, exported and served.
    """
    if isinstance(model, ScatterNet):
        return model.head, model.fixed_input
    return model, None


def fixed_features(model: nn.Module, dataset: TensorDataset) -> TensorDataset:
    """`dataset` as the module that `split(model)` trains sees it: its inputs through the fixed
    transform, in half precision as every party keeps features (loaders and `evaluate` hand
    them out in float32). Without a fixed transform, `dataset` itself.
    """
    _, transform = split(model)
    if transform is None:
        return dataset
    images, labels = dataset.tensors
    return TensorDataset(transform(images).half(), labels)


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model by config name; with a seed, its initial weights are reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name]()
