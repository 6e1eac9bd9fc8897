"""`dpfl audit`'s two modes and the one-line errors that keep them apart (no federation is run here)."""

import pytest
import tomli_w

from common.config import RunConfig
from common.errors import ConfigError, DpflError
from server.audit import audit_run
from server.results import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from simulations.audit import audit_config
from simulations.cli import main
from simulations.presets import load_preset


def dpfl(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["audit"], "give a finished run's directory (dpfl audit RUN_DIR) or --canaries M"),
        (["audit", "--canaries", "100", "outputs/x"], "--canaries runs a new audit federation: drop RUN_DIR"),
        (["audit", "--white-box", "outputs/x"], "--preset, --set, --white-box and --black-box go with --canaries M"),
        (["audit", "--canaries", "15"], "canaries = 15 cannot be combined with num-clients = 10"),
        (["audit", "--canaries", "100", "--set", "dp-mode=central"], "cannot be combined with dp-mode = central"),
        (["audit", "--canaries", "100", "--set", "ledger-dir=/tmp/kept"], "an audit run keeps its ledgers in its own run directory"),
        (["audit", "--canaries", "20000", "--black-box"], "the 10000 MNIST test images"),
        (["audit", "--canaries", "100", "--white-box", "--black-box"], "not allowed with argument"),
        (["simulate", "--set", "canaries=100"], "canaries = 100 makes an audit run; run it with `dpfl audit --canaries 100`"),
        (["sweep", "--set", "canaries=100", "--epsilons", "1"], "makes an audit run"),
    ],
)
def test_bad_audit_requests_are_one_line_errors(capsys, argv, message):
    code, output = dpfl(capsys, *argv)
    assert code == 2
    assert message in output
    assert "Traceback" not in output


def test_an_audit_config_is_labelled_and_keeps_everything_else():
    config = audit_config(load_preset("smoke", ["target-epsilon=4"]), 10, "mislabelled")
    assert config.name == "audit-smoke"
    assert (config.audit.canaries, config.audit.canary_kind) == (10, "mislabelled")
    assert config.privacy.target_epsilon == 4 and config.federation.num_clients == 2
    assert audit_config(config, 10, "gradient").name == "audit-smoke"  # labelled once
    with pytest.raises(ConfigError, match="at least 2 canaries"):
        audit_config(config, 1, "gradient")


def test_an_audit_run_is_not_audited_as_a_real_run(tmp_path):
    config = audit_config(RunConfig(), 100, "gradient")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(tomli_w.dumps(config.to_flat()))
    for name in (MODEL_FILE, SUMMARY_FILE):
        (run_dir / name).write_text("{}")
    with pytest.raises(DpflError, match="is an audit run \\(canaries = 100\\)"):
        audit_run(run_dir)


def test_an_interrupted_audit_run_is_not_resumed(tmp_path):
    from server.results import RunDirectory
    from simulations.engine import resume

    config = audit_config(load_preset("smoke", [f"output-dir={tmp_path}"]), 10, "gradient")
    run_dir = RunDirectory.create(config)
    with pytest.raises(DpflError, match="is an audit run: its auditor watched the rounds"):
        resume(run_dir.path)


def test_each_audit_is_a_fresh_draw_and_gradient_canaries_must_fit_the_model():
    base = load_preset("smoke")
    seeds = {audit_config(base, 10, "mislabelled").audit.canary_seed for _ in range(5)}
    assert len(seeds) > 1  # membership drawn anew: a second audit is a second trial
    with pytest.raises(ConfigError, match="each needs a coordinate of its own and model = 'cnn' trains 26010"):
        audit_config(base, 60_000, "gradient")


def test_an_audit_that_cannot_reach_the_accountants_epsilon_says_so():
    import numpy as np

    from server.canary_audit import canary_report
    from simulations.cli.audit import _canary_verdict

    included = np.arange(200) % 2 == 0
    report = canary_report("gradient", included.astype(float), included, 8.0, 1e-5, 1.0)
    assert not report.can_contradict and report.to_json()["can-contradict-accountant"] is False
    assert "cannot test that figure" in _canary_verdict(report)
