"""Opacus-compatible MNIST models.

No BatchNorm: it mixes examples within a batch, which breaks per-sample gradients and so
DP-SGD. Activations are tanh: bounded activations keep activations and gradients small
under clipping, and do better than ReLU under DP-SGD (Papernot et al., "Tempered sigmoid
activations for deep learning with differential privacy", 2021).
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from common.errors import ConfigError
from common.public_features import FEATURES as FONT_FEATURES, FontFeatures
from common.scattering import Scattering2D


class MnistCNN(nn.Module):
    """The small CNN of the DP-SGD MNIST literature: two strided convs and two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
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
            nn.Linear(32, num_classes),
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

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.scattering = Scattering2D((28, 28), J=SCATTERING_J, L=SCATTERING_L)
        self.head = nn.Sequential(
            nn.GroupNorm(27, 81, affine=False), nn.Flatten(), nn.Linear(81 * 7 * 7, num_classes)
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


class ScatterFontNet(nn.Module):
    """ScatterNet features and font-CNN features side by side, and a trained linear classifier.

    The second block is the frozen feature extractor of a CNN pre-trained on digits rendered
    from fonts (`common.public_features`): public data, so it costs no privacy, and it adds
    what wavelets miss, digit shapes. Each block is normalised per image, the scattering
    coefficients by GroupNorm as in `ScatterNet`, the font features by their synthetic
    statistics, and scaled so the font block's norm is half the scattering block's (chosen on
    validation data: equal norms did 0.4 points worse under DP-SGD). Only
    `head`, one linear layer, is trained and sent; both extractors are buffers outside
    `state_dict`. Training computes the features once (`fixed_input`); `forward` runs the whole
    model as plain tensor operations, so it exports like `ScatterNet`.
    """

    SCATTERING = 81 * 7 * 7
    FONT_SCALE = 0.5 * (SCATTERING / FONT_FEATURES) ** 0.5  # expected norm: half the scattering block's

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.scattering = Scattering2D((28, 28), J=SCATTERING_J, L=SCATTERING_L)
        self.fonts = FontFeatures()
        self.head = nn.Linear(self.SCATTERING + FONT_FEATURES, num_classes)

    def _combine(self, scattering: torch.Tensor, fonts: torch.Tensor) -> torch.Tensor:
        normalised = F.group_norm(scattering, 27).flatten(1)
        return torch.cat([normalised, fonts * self.FONT_SCALE], dim=1)

    @torch.no_grad()
    def fixed_input(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The concatenated features of `images` (N, 1, 28, 28) -> (N, 4097), scattering by kymatio, in batches."""
        scattering = _kymatio_scattering()
        return torch.cat(
            [
                self._combine(scattering(batch).flatten(1, 2), self.fonts(batch))
                for batch in images.split(batch_size)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._combine(self.scattering(x), self.fonts(x)))


#: By their `model` names, `BUILT_IN_MODELS` (a test keeps the two equal).
MODELS: dict[str, type[nn.Module]] = {"cnn": MnistCNN, "scatnet": ScatterNet, "scatnet+fonts": ScatterFontNet}


def split(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The module that training updates, and the fixed transform its inputs go through first (or None).

    Trainers run the transform once over their data and train the module on the result;
    the full model (`model(images)`) is what gets evaluated, exported and served.
    """
    if isinstance(model, (ScatterNet, ScatterFontNet)):
        return model.head, model.fixed_input
    return model, None


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict names of the parameters `split(model)` trains, in the trained module's order.

    Client and server name the trained coordinates alike with them: the flat vector of these
    tensors, concatenated in this order, is what an audit's gradient canaries index.
    """
    trainable = {id(parameter) for parameter in split(model)[0].parameters()}
    return [name for name, parameter in model.named_parameters() if id(parameter) in trainable]


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


def build_model(name: str, seed: int | None = None, num_classes: int = 10) -> nn.Module:
    """A fresh model by config name (a built-in one, or `package.module:factory`); with a seed,
    its initial weights are reproducible.

    A factory's model is checked before any training, each failure one line that says what
    to change: its state must be parameters only (a buffer a forward pass updates would be
    released without DP-SGD's noise), one forward pass of a (2, 1, 28, 28) batch must give
    (2, num_classes) scores, Opacus' `ModuleValidator` must accept it (BatchNorm, for one,
    mixes examples and breaks per-sample gradients), and one private step must run, as
    training will run it.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if name in MODELS:
        return MODELS[name](num_classes)
    model = _from_factory(name)
    _check_custom(name, model, num_classes)
    return model


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as err:
        raise ConfigError(f"model = {spec!r}: cannot import {module_name} ({err}); is its package installed or on PYTHONPATH on every machine?") from None
    except AttributeError:
        raise ConfigError(f"model = {spec!r}: {module_name} has no {attribute}") from None
    try:
        model = factory()
    except Exception as err:  # the user's code: whatever it raises, one line
        raise ConfigError(f"model = {spec!r}: calling {attribute}() failed ({type(err).__name__}: {err})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model = {spec!r}: {attribute}() returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _check_custom(spec: str, model: nn.Module, num_classes: int) -> None:
    # Imported here: serving an exported model (`dpfl predict`) must not need Opacus.
    from opacus.validators import ModuleValidator

    parameters = {name for name, _ in model.named_parameters()}
    other = [name for name in model.state_dict() if name not in parameters]
    if other or any(type(m).get_extra_state is not nn.Module.get_extra_state for m in model.modules()):
        raise ConfigError(
            f"model = {spec!r} keeps state that is not a parameter ({', '.join(other) or 'extra state'}): "
            "training could change it from the data without DP-SGD's noise, and it would be sent; "
            "register fixed tensors with persistent=False, or drop them"
        )
    try:
        with torch.no_grad():
            scores = model(torch.zeros(2, 1, 28, 28))
    except Exception as err:  # the user's forward pass
        raise ConfigError(
            f"model = {spec!r} does not accept the data's shape (N, 1, 28, 28): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if tuple(scores.shape) != (2, num_classes):
        raise ConfigError(
            f"model = {spec!r} gives scores of shape {tuple(scores.shape)} for 2 images; with "
            f"num-classes = {num_classes} it must give (2, {num_classes})"
        )
    errors = ModuleValidator.validate(model, strict=False)  # after the forward pass: lazy layers exist now
    if errors:
        raise ConfigError(
            f"model = {spec!r} cannot train with DP-SGD: {str(errors[0]).splitlines()[0]} "
            "(replace BatchNorm with GroupNorm, or let opacus.validators.ModuleValidator.fix(model) do it in your factory)"
        )
    _private_step(spec, copy.deepcopy(model), num_classes)


def _private_step(spec: str, model: nn.Module, num_classes: int) -> None:
    """One DP-SGD step as training takes it, on a copy: what `ModuleValidator` does not catch
    (a BatchNorm subclass, weights used outside their layer) fails here, before any budget is spent."""
    from opacus import PrivacyEngine

    images, labels = torch.zeros(2, 1, 28, 28), torch.arange(2) % num_classes
    loader = torch.utils.data.DataLoader(TensorDataset(images, labels), batch_size=2)
    try:
        private, optimizer, criterion, loader = PrivacyEngine(accountant="prv").make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
        for batch, targets in loader:
            criterion(private(batch), targets).backward()
            optimizer.step()
    except Exception as err:  # Opacus' refusal or the model's failure, in the user's layers
        raise ConfigError(
            f"model = {spec!r} cannot train with DP-SGD: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
