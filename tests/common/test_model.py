import torch
from opacus.validators import ModuleValidator
from torch.utils.data import TensorDataset

from common.config import BUILT_IN_MODELS
from common.model import MODELS, build_model, fixed_features, split


def test_every_model_is_opacus_compatible():
    assert tuple(MODELS) == BUILT_IN_MODELS  # the names the config accepts
    for name in MODELS:
        model = build_model(name)
        assert ModuleValidator.validate(model, strict=False) == []
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_seeded_models_start_identical():
    a, b = build_model("cnn", seed=3), build_model("cnn", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_scatnet_trains_only_its_head_on_fixed_features():
    model = build_model("scatnet", seed=0)
    trainable, transform = split(model)
    assert trainable is model.head and split(build_model("cnn"))[1] is None
    # Only the linear classifier is state: the scattering filters never travel or get averaged.
    assert sum(t.numel() for t in model.state_dict().values()) == 81 * 7 * 7 * 10 + 10
    images = torch.randn(4, 1, 28, 28)
    features = transform(images)
    assert features.shape == (4, 81, 7, 7) and not features.requires_grad
    assert torch.equal(features, transform(images))  # fixed: no parameters, no randomness
    # `forward` scatters with plain convolutions, training with kymatio: equal to float rounding.
    assert torch.allclose(model(images), trainable(features), atol=1e-4)


def test_fixed_features_are_what_the_trained_module_is_scored_on():
    images, labels = torch.randn(6, 1, 28, 28), torch.arange(6)
    dataset = TensorDataset(images, labels)
    assert fixed_features(build_model("cnn"), dataset) is dataset  # nothing fixed to precompute
    model = build_model("scatnet", seed=0)
    features, kept = fixed_features(model, dataset).tensors
    assert features.dtype == torch.float16 and torch.equal(kept, labels)
    trainable, _ = split(model)
    # Half-precision storage, float32 compute: the scores match the full model's to rounding.
    assert torch.allclose(trainable(features.float()), model(images), atol=1e-2)
