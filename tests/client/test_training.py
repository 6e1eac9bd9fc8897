"""DP-SGD as wired in `dp_train`: ghost clipping must clip exactly like per-sample clipping."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.privacy.planning import PrivacyBudget, plan_noise
from client.training import dp_train


def clipped_mean_gradient(model: nn.Module, data: TensorDataset, clip: float) -> list[torch.Tensor]:
    """The textbook DP-SGD gradient without noise: the mean of per-example gradients clipped to `clip`."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, x, y):
        logits = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, *data.tensors)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_example.values()))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factors, per_example[name]) / len(factors) for name in params]


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_one_step_equals_the_clipped_mean_of_per_example_gradients(tiny_config, clip):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 20), torch.randint(0, 10, (64,)))
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))
    before = [p.detach().clone() for p in model.parameters()]
    expected = clipped_mean_gradient(model, data, clip)

    # One step over the whole set (sampling rate 1, so Poisson sampling takes every example)
    # and no noise (an infinite budget): what is left is the clipping.
    run = dataclasses.replace(
        tiny_config,
        training=dataclasses.replace(tiny_config.training, batch_size=len(data), local_epochs=1, learning_rate=1.0, momentum=0.0),
        privacy=dataclasses.replace(tiny_config.privacy, max_grad_norm=clip),
    )
    plan = plan_noise("test", PrivacyBudget(math.inf, 1e-5), {()}, "prv", len(data), len(data), 1, 1)
    assert dp_train(model, data, plan, run) == ((0.0, 1.0, 1),)  # what Opacus counted: one step, no noise

    for old, new, gradient in zip(before, model.parameters(), expected):
        torch.testing.assert_close(old - new.detach(), gradient, rtol=1e-4, atol=1e-6)
    if clip < 1:  # the bound binds: the update is the mean of vectors of norm <= clip
        step = torch.sqrt(sum((old - new.detach()).pow(2).sum() for old, new in zip(before, model.parameters())))
        assert step <= clip + 1e-6


def test_noise_and_sampling_do_not_follow_torchs_global_seed(tiny_config):
    """A process that seeded torch, as building a model with the config's seed does, still draws fresh noise."""
    data = TensorDataset(torch.randn(64, 20), torch.randint(0, 10, (64,)))
    run = dataclasses.replace(tiny_config, training=dataclasses.replace(tiny_config.training, batch_size=16, local_epochs=1))
    plan = plan_noise("test", PrivacyBudget(4.0, 1e-5), {()}, "prv", len(data), 16, 1, 1)
    assert plan.noise_multiplier > 0
    updates = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Linear(20, 10)  # the same initial weights both times
        dp_train(model, data, plan, run)
        updates.append(model.weight.detach().clone())
    assert not torch.equal(updates[0], updates[1])


def test_gradient_canaries_are_one_more_clipped_example_each(tiny_config):
    """At sampling rate 1 every canary joins the step: the update gains clip / (expected batch) at its coordinate."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 20), torch.randint(0, 10, (64,)))
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))
    twin = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))
    twin.load_state_dict(model.state_dict())
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    clip = 0.05
    run = dataclasses.replace(
        tiny_config,
        training=dataclasses.replace(tiny_config.training, batch_size=len(data), local_epochs=1, learning_rate=1.0, momentum=0.0),
        privacy=dataclasses.replace(tiny_config.privacy, max_grad_norm=clip),
    )
    plan = plan_noise("test", PrivacyBudget(math.inf, 1e-5), {()}, "prv", len(data), len(data), 1, 1)
    canaries = torch.tensor([3, 320, 500]).numpy()  # in the first weight, the first bias and the last layer
    dp_train(model, data, plan, run, canaries)
    dp_train(twin, data, plan, run)
    with_canaries = before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    without = before - torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
    difference = with_canaries - without
    expected = torch.zeros_like(difference)
    expected[canaries] = clip * min(1.0, clip / (clip + 1e-6)) / len(data)
    torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-7)
