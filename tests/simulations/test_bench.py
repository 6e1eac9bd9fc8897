"""`dpfl bench --quick`: the benchmark itself runs end to end and reports every figure."""

import json

import pytest

from simulations.cli import main


@pytest.mark.slow
def test_quick_bench_reports_every_figure_with_its_target(tmp_path, capsys):
    assert main(["bench", "--quick", "--set", f"output-dir={tmp_path}", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("bench-*.json")
    figures = json.loads(report.read_text())
    for name in ("iid-accuracy", "dirichlet-accuracy", "run-seconds", "dp-epoch-overhead", "orchestration-overhead"):
        assert figures[name] > 0
        assert figures["targets"][name]["ratio"] == pytest.approx(figures[name] / figures["targets"][name]["target"])
    assert figures["dp-epoch-seconds"] > 0 and figures["plain-epoch-seconds"] > 0
    assert 0 < figures["iid-epsilon"] <= 2.0
    assert "orchestration-overhead" in capsys.readouterr().out
