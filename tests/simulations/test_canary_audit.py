"""The one-run canary audit end to end: it catches a broken DP-SGD and does not cry wolf.

Each test runs a real audit federation (Flower's simulation, Ray actors, Opacus) of 5
clients on 10,000 MNIST images for 3 rounds, with 500 canaries. The broken variant is
dpfl's own ClientApp with Opacus' noise removed: the ledger still plans, charges and
reports epsilon = 2, as a silent bug would.
"""

from unittest import mock

import pytest
import torch
from flwr.clientapp import ClientApp

from simulations.audit import audit_config, run_canary_audit
from simulations.presets import load_preset

pytestmark = pytest.mark.slow

noiseless_app = ClientApp()


@noiseless_app.train()
def noiseless_train(msg, context):
    """dpfl's train handler with DP-SGD's Gaussian noise replaced by zeros."""
    import opacus.optimizers.optimizer_fast_gradient_clipping as ghost

    from client.client_app import train

    def no_noise(std, reference, generator=None, secure_mode=False):
        return torch.zeros_like(reference)

    with mock.patch.object(ghost, "_generate_noise", no_noise):
        return train(msg, context)


def audit(tmp_path, data_dir, epsilon, kind="gradient", client_app=None):
    config = load_preset(
        None,
        [
            f"output-dir={tmp_path}",
            f"data-dir={data_dir}",
            f"target-epsilon={epsilon}",
            "num-clients=5",
            "train-subset=10000",
            "num-server-rounds=3",
        ],
    )
    report, run_dir = run_canary_audit(audit_config(config, 500, kind), client_app)
    assert run_dir.name.split("-", 2)[-1].startswith("audit-")
    assert (run_dir / "audit.json").is_file() and (run_dir / "canary-scores.png").is_file()
    return report


def test_it_catches_dp_sgd_without_noise(tmp_path, data_dir):
    report = audit(tmp_path, data_dir, 2, client_app=noiseless_app)
    assert report.accountant_epsilon == pytest.approx(2.0, abs=0.01)  # the ledger still claims 2
    assert report.bound.epsilon > 2.0
    assert report.contradicts_accountant


@pytest.mark.parametrize("epsilon", [1, 2, 8])
def test_it_does_not_cry_wolf_on_correct_dp_sgd(tmp_path, data_dir, epsilon):
    report = audit(tmp_path, data_dir, epsilon)
    assert report.accountant_epsilon <= epsilon
    assert report.bound.epsilon <= report.accountant_epsilon
    assert not report.contradicts_accountant


def test_a_non_private_run_gets_a_large_bound(tmp_path, data_dir):
    report = audit(tmp_path, data_dir, "inf")
    assert report.bound.epsilon > 3.0  # of the 4.61 that 500 canaries can certify at most
    assert report.ceiling == pytest.approx(4.61, abs=0.01)


def test_black_box_does_not_cry_wolf(tmp_path, data_dir):
    report = audit(tmp_path, data_dir, 2, kind="mislabelled")
    assert report.bound.epsilon <= report.accountant_epsilon
