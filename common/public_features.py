"""Features learned from public data only: a CNN pre-trained on digits rendered from fonts.

`dpfl pretrain-public` (`simulations.pretrain`) renders the digits of the installed TrueType
and OpenType fonts, augments them and trains a small CNN on them; no MNIST image or
statistic takes part. What ships with the package (`common/weights/`) is that network's
feature extractor, frozen, with its BatchNorm layers folded into the convolutions, and the
mean and standard deviation of its features over synthetic images, by which the features
are standardised. Everything in the file is public, so using it costs no privacy.

`FontFeatures` holds the tensors as buffers outside `state_dict` (`persistent=False`), as
`common.scattering.Scattering2D` holds its filters: they are never trained, never sent and
never averaged; every party loads the same file, and exports carry them as constants.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: JSON, not a torch file: Flower's app bundle (`flwr run`) carries only text kinds (.py, .json,
#: .toml, ...), and a server or client built from it must find the weights there too.
WEIGHTS_FILE = WEIGHTS_DIR / "font-cnn-weights.json"
MANIFEST_FILE = WEIGHTS_DIR / "font-cnn.json"

#: Output channels of the five 3 x 3 convolutions; max-pooling follows the 2nd, 4th and 5th.
CHANNELS = (32, 32, 64, 64, 128)
POOL_AFTER = (1, 3, 4)
FEATURES = 128
#: Added to the features' standard deviation before dividing, as BatchNorm adds to a variance.
STD_FLOOR = 1e-3


def extractor_keys() -> list[str]:
    """The tensors a weights file holds, in a fixed order."""
    keys = [f"conv{i}.{part}" for i in range(len(CHANNELS)) for part in ("weight", "bias")]
    return [*keys, "fc.weight", "fc.bias", "feature_mean", "feature_std"]


def extract(tensors: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The unstandardised 128-d features of `pixels` (N, 1, 28, 28), ink 1 and background 0.

    The convolutions carry their BatchNorm folded in (scale into the weights, shift into
    the bias), so this is the trained network's forward pass in eval mode, as plain ops.
    """
    x = pixels
    for i in range(len(CHANNELS)):
        x = F.relu(F.conv2d(x, tensors[f"conv{i}.weight"], tensors[f"conv{i}.bias"], padding=1))
        if i in POOL_AFTER:
            x = F.max_pool2d(x, 2)
    return F.relu(F.linear(x.flatten(1), tensors["fc.weight"], tensors["fc.bias"]))


def weights_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The weights file's content: every tensor of `extractor_keys` as float32, base64, with its shape."""
    entries = {}
    for key in extractor_keys():
        array = tensors[key].detach().float().contiguous().numpy()
        entries[key] = {"shape": list(array.shape), "float32": base64.b64encode(array.astype("<f4").tobytes()).decode()}
    return json.dumps(entries).encode()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file written by `weights_bytes`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall dpfl, or run `dpfl pretrain-public --install`")
    entries = json.loads(path.read_text())
    missing = [key for key in extractor_keys() if key not in entries]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a font-CNN weights file")
    return {
        key: torch.from_numpy(
            np.frombuffer(base64.b64decode(entries[key]["float32"]), dtype="<f4").reshape(entries[key]["shape"]).copy()
        )
        for key in extractor_keys()
    }


@functools.cache
def _shipped() -> dict[str, torch.Tensor]:
    """The shipped weights, read once per process."""
    return read_weights(WEIGHTS_FILE)


def manifest() -> dict[str, Any]:
    """The shipped weights' manifest: fonts used, recipe, seeds, held-out accuracy, statistics."""
    return json.loads(MANIFEST_FILE.read_text())


class FontFeatures(nn.Module):
    """The frozen font-CNN features of MNIST-normalised images, standardised with synthetic statistics.

    Inputs are normalised as `common.data` hands them out, (pixel / 255 - MEAN) / STD; the
    network was trained on pixels in [0, 1], so the input's fixed encoding is undone first.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        from common.data import MEAN, STD  # the data pipeline's fixed encoding, nothing fitted to it

        self.mean, self.std = MEAN, STD
        for key, value in (tensors if tensors is not None else _shipped()).items():
            self.register_buffer(key.replace(".", "_"), value, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tensors = {key: self.get_buffer(key.replace(".", "_")) for key in extractor_keys()}
        features = extract(tensors, images * self.std + self.mean)
        return (features - tensors["feature_mean"]) / (tensors["feature_std"] + STD_FLOOR)
