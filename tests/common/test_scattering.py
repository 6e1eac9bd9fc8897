"""The scattering transform as plain convolutions equals kymatio's, and is what ScatterNet serves."""

import pytest
import torch

from common.model import ScatterNet
from common.scattering import Scattering2D

#: The issue's bound on the features' max absolute difference from kymatio.
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_plain_scattering_equals_kymatio_on_mnist(data_dir):
    from common.data import load_mnist

    images = load_mnist(data_dir, train=False).tensors[0][:512]
    expected = ScatterNet.fixed_input(images)  # kymatio's FFTs
    actual = Scattering2D((28, 28), J=2, L=8)(images)
    assert actual.shape == expected.shape == (512, 81, 7, 7)
    assert (actual - expected).abs().max() <= TOLERANCE
    assert expected.abs().max() > 1  # the comparison is over features of real size


@pytest.mark.parametrize(("shape", "J"), [((32, 32), 3), ((20, 24), 1)])
def test_other_scales_and_shapes_keep_kymatios_order(shape, J):
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    images = torch.randn(3, 1, *shape)
    expected = ScatteringTorch2D(J=J, shape=shape, L=4)(images).flatten(1, 2)
    actual = Scattering2D(shape, J=J, L=4)(images)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= TOLERANCE


def test_filters_are_constants_outside_the_state_dict():
    model = ScatterNet()
    assert all(name.startswith("head.") for name in model.state_dict())  # never on the wire
    assert list(model.parameters()) == list(model.head.parameters())
    assert all(not buffer.requires_grad for buffer in model.scattering.buffers())
