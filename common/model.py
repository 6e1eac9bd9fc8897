"""Opacus-compatible MNIST models.

No BatchNorm: it mixes examples within a batch, which breaks per-sample gradients and so
DP-SGD. Activations are tanh: bounded activations keep activations and gradients small
under clipping, and do better than ReLU under DP-SGD (Papernot et al., "Tempered sigmoid
activations for deep learning with differential privacy", 2021).
"""

from __future__ import annotations

import torch
from torch import nn


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


MODELS: dict[str, type[nn.Module]] = {"cnn": MnistCNN}


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model by config name; with a seed, its initial weights are reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name]()
