"""`dpfl plan`: figures equal to an independent Opacus accountant's, and honest warnings."""

import math
import re
import subprocess
import sys

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.privacy.forecast import central_forecast, forecast
from simulations.cli import main
from simulations.presets import load_preset


def accountant_epsilon(name, sigma, rate, steps, delta):
    fresh = create_accountant(name)
    fresh.history = [(sigma, rate, steps)]
    return fresh.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_plan_matches_an_independent_accountant(accountant):
    config = load_preset("mnist-eps2", [f"accountant={accountant}", "local-epochs=3", "batch-size=600"])
    (group,) = forecast(config)  # 10 IID shards of 6000: one group
    assert group.partition_ids == list(range(10)) and group.shard_size == 6000
    assert group.sample_rate == pytest.approx(600 / 6000)
    assert group.steps_per_round == 3 * 10
    sigma = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.1, steps=300, accountant=accountant
    )
    assert group.noise_multiplier == sigma
    for k, epsilon in enumerate(group.epsilon_by_round, start=1):
        assert epsilon == pytest.approx(accountant_epsilon(accountant, sigma, 0.1, 30 * k, 1e-5), rel=1e-9)
    assert group.epsilon_by_round[-1] <= 2.0 and group.warnings == []


def test_plan_groups_unequal_dirichlet_shards():
    groups = forecast(load_preset("mnist-eps2", ["partitioner=dirichlet", "dirichlet-alpha=0.3"]))
    assert sum(len(g.partition_ids) for g in groups) == 10
    assert sum(g.shard_size * len(g.partition_ids) for g in groups) == 60_000
    assert all(g.epsilon_by_round[-1] <= 2.0 for g in groups)


def test_plan_warns_when_a_fixed_noise_overspends_the_budget():
    (group,) = forecast(load_preset("mnist-eps2", ["noise-multiplier=1.0", "num-server-rounds=3"]))
    assert group.noise_multiplier == 1.0
    assert any("exhausted after round 0" in w for w in group.warnings)


def test_plan_warns_when_noise_drowns_the_signal():
    (group,) = forecast(load_preset("smoke", ["target-epsilon=0.05", "batch-size=10", "num-server-rounds=20"]))
    assert any("learning is unlikely" in w for w in group.warnings)


def test_plan_labels_non_private_runs():
    (group,) = forecast(load_preset("smoke", ["target-epsilon=inf"]))
    assert group.noise_multiplier == 0.0
    assert all(math.isinf(e) for e in group.epsilon_by_round)


def test_plan_command_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "plan", "--preset", "smoke"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "steps/round" in result.stdout and "0-1" in result.stdout


def test_plan_start_up_loads_only_what_planning_needs():
    # `dpfl plan` must start quickly: the CLI loads no heavy library before the
    # command runs (so simulations.cli.plan's garbage-collector pause covers torch and Opacus), and
    # planning never loads Flower.
    probe = (
        "import sys, simulations.cli; early = {'torch', 'opacus', 'flwr'} & set(sys.modules); "
        "import common.privacy.forecast; print(sorted(early), 'flwr' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "False"]


CENTRAL = ["dp-mode=central", "num-clients=10", "fraction-train=0.3", "target-delta=1e-3", "target-epsilon=3"]
CENTRAL += ["num-server-rounds=5", "accountant=rdp", "central-noise-multiplier=1.0"]


@pytest.mark.parametrize(
    "sampling, rate, sensitivity",
    [("fixed", 1.0, 2.0), ("poisson", 0.3, 1.0)],  # 3 of 10 without replacement: sigma / 2, no amplification
)
def test_the_central_plan_is_the_servers_client_level_accounting(sampling, rate, sensitivity):
    plan = central_forecast(load_preset("smoke", [*CENTRAL, f"client-sampling={sampling}"]))
    assert (plan.expected_clients, plan.sample_rate, plan.accounted_noise) == (3, rate, 1.0 / sensitivity)
    for k, epsilon in enumerate(plan.epsilon_by_round, start=1):
        assert epsilon == pytest.approx(accountant_epsilon("rdp", 1.0 / sensitivity, rate, k, 1e-3), rel=1e-9)
    # The planned sigma spends the budget in the planned rounds, to within Opacus' tolerance.
    reached = accountant_epsilon("rdp", plan.target_noise_multiplier / sensitivity, rate, 5, 1e-3)
    assert 3.0 - 0.011 <= reached <= 3.0


def test_the_central_plan_command_says_how_to_reach_the_budget(capsys):
    assert main(["plan", "--preset", "smoke", *(f"--set={pair}" for pair in [*CENTRAL, "client-sampling=poisson"])]) == 0
    out = capsys.readouterr().out
    assert "central DP (client-level), 10 clients, 5 rounds" in out and "below 1/num-clients = 0.1" in out
    assert "poisson, each client with q = 0.3 a round: 3 expected" in out
    hint = re.search(r"for epsilon = 3 after 5 rounds: --set central-noise-multiplier=(\d+\.\d{3})\n", out)
    sigma = float(hint[1])
    assert 3.0 - 0.02 <= accountant_epsilon("rdp", sigma, 0.3, 5, 1e-3) <= 3.0  # rounded up: within the budget
    assert "exhausted after round" in out  # sigma = 1 spends 3 before round 5
