import torch
from opacus.validators import ModuleValidator

from common.model import MODELS, build_model


def test_every_model_is_opacus_compatible():
    for name in MODELS:
        model = build_model(name)
        assert ModuleValidator.validate(model, strict=False) == []
        assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_seeded_models_start_identical():
    a, b = build_model("cnn", seed=3), build_model("cnn", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
