"""`dpfl sweep`: one CSV row per (epsilon, repeat) as runs finish, resumable, with a plot."""

import csv

import pytest

from common.errors import ConfigError
from simulations.sweep import SWEEP_PLOT, parse_epsilons, sweep

TINY = ["num-server-rounds=1", "train-subset=1000", "local-epochs=1"]


def rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # several whole simulations
def test_sweep_appends_rows_resumes_and_plots(tmp_path):
    csv_path = sweep("smoke", [1.0], 1, TINY, tmp_path)
    assert [r["target-epsilon"] for r in rows(csv_path)] == ["1.0"]

    # Asked again with one more epsilon, it runs only the missing one (an interrupted sweep resumes).
    sweep("smoke", [1.0, float("inf")], 1, TINY, tmp_path)
    table = rows(csv_path)
    assert [r["target-epsilon"] for r in table] == ["1.0", "inf"]
    assert len(list((tmp_path / "runs").iterdir())) == 2
    private, non_private = table
    assert 0 < float(private["epsilon"]) <= 1.0
    assert non_private["epsilon"] == "inf"
    assert float(non_private["test-accuracy"]) > float(private["test-accuracy"]) - 0.05
    assert (tmp_path / SWEEP_PLOT).stat().st_size > 10_000


def test_bad_epsilon_lists_are_rejected():
    assert parse_epsilons("0.5, 1,inf") == [0.5, 1.0, float("inf")]
    for bad in ["0", "-1", "two", "1,,2", "nan"]:
        with pytest.raises(ConfigError, match="--epsilons item .* is invalid"):
            parse_epsilons(bad)
