"""Test-set evaluation, shared by the server's central evaluation and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 2000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (0..1) of `model` on an in-memory dataset."""
    model.eval()
    images, labels = dataset.tensors
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size].float())  # features may be stored in half precision
        target = labels[start : start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
    return total_loss / len(labels), correct / len(labels)
