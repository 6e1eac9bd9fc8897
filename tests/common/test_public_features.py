"""`scatnet+fonts`: the shipped font-CNN features, fixed and public, and a head that alone is trained."""

from __future__ import annotations

import pytest
import tomli_w
import torch

from common.config import RunConfig
from common.data import load_mnist
from common.export import TORCHSCRIPT_FILE, export_model, load_torchscript
from common.model import ScatterFontNet, build_model, fixed_features, split, trainable_keys
from common.public_features import FEATURES, FontFeatures, manifest
from common.storage import CONFIG_FILE, MODEL_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_only_the_head_is_state_and_trained():
    model = build_model("scatnet+fonts", seed=0)
    trainable, transform = split(model)
    assert trainable is model.head and transform is not None
    # The font CNN and the scattering filters are buffers outside state_dict: never sent, never averaged.
    assert list(model.state_dict()) == ["head.weight", "head.bias"] == trainable_keys(model)
    assert sum(t.numel() for t in model.state_dict().values()) == (81 * 7 * 7 + FEATURES) * 10 + 10
    assert not any(buffer.requires_grad for buffer in model.buffers())


def test_features_are_fixed_and_what_forward_computes(data_dir):
    images = load_mnist(data_dir, train=False).tensors[0][:8]
    model = build_model("scatnet+fonts", seed=0)
    features = model.fixed_input(images)
    assert features.shape == (8, 81 * 7 * 7 + FEATURES) and not features.requires_grad
    assert torch.equal(features, build_model("scatnet+fonts", seed=1).fixed_input(images))
    # Block norms: GroupNorm'd scattering, and standardised font features scaled to about half of it.
    scattering, fonts = features[:, : 81 * 49].norm(dim=1), features[:, 81 * 49 :].norm(dim=1)
    assert 0.3 < float((fonts / scattering).mean()) < 1  # the font block weighs half
    assert torch.allclose(model(images), model.head(features), atol=1e-3)
    half = fixed_features(model, torch.utils.data.TensorDataset(images, torch.zeros(8, dtype=torch.long))).tensors[0]
    assert half.dtype == torch.float16 and torch.allclose(model.head(half.float()), model(images), atol=2e-2)


def test_the_font_features_alone_read_mnist_digits(data_dir):
    """Pre-trained on fonts only, the features separate MNIST digits: a nearest-class-mean
    rule fitted on 1,000 training images gets most of 1,000 test images right."""
    train, test = load_mnist(data_dir, train=True).tensors, load_mnist(data_dir, train=False).tensors
    fonts = FontFeatures()
    with torch.no_grad():
        fitted, scored = fonts(train[0][:1000]), fonts(test[0][:1000])
    means = torch.stack([fitted[train[1][:1000] == digit].mean(0) for digit in range(10)])
    accuracy = (torch.cdist(scored, means).argmin(1) == test[1][:1000]).float().mean()
    assert accuracy > 0.9


def test_the_manifest_says_the_statistics_are_synthetic():
    shipped = manifest()
    assert "no MNIST" in shipped["what"] and "renders" in shipped["statistics"]
    assert shipped["held-out-fonts-accuracy"] > 0.9


def test_the_exported_model_holds_both_extractors(data_dir, tmp_path):
    model = build_model("scatnet+fonts", seed=0).eval()
    torch.save(model.state_dict(), tmp_path / MODEL_FILE)
    config = RunConfig.from_mapping({"name": "fonts", "model": "scatnet+fonts", "data-dir": str(data_dir)})
    (tmp_path / CONFIG_FILE).write_text(tomli_w.dumps(config.to_flat()))
    report = export_model(tmp_path, tmp_path / "export")
    assert report.parameters == (81 * 7 * 7 + FEATURES) * 10 + 10
    images = load_mnist(data_dir, train=False).tensors[0][:16]
    scripted = load_torchscript(tmp_path / "export" / TORCHSCRIPT_FILE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images), rtol=1e-4, atol=1e-4)
    assert isinstance(model, ScatterFontNet)
