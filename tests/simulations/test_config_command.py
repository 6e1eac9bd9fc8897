"""`dpfl config`: the resolved config, and the generated app config and reference kept current."""

import shutil
import subprocess
import sys
import tomllib

from common.config import RunConfig
from simulations.cli import main as dpfl
from tests.conftest import REPO


def test_prints_the_resolved_config_as_toml(capsys):
    assert dpfl(["config", "--set", "target-epsilon=4"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed == {**RunConfig().to_flat(), "target-epsilon": 4.0}


def test_check_and_write_keep_the_generated_files_equal_to_the_schema(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for name in ("pyproject.toml", "docs/configuration.md"):
        shutil.copy(REPO / name, tmp_path / name)
    assert dpfl(["config", "--check", "--root", str(tmp_path)]) == 0

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("learning-rate = 16.0", "learning-rate = 2.0"))
    assert dpfl(["config", "--check", "--root", str(tmp_path)]) == 1
    assert "pyproject.toml is stale" in capsys.readouterr().out

    assert dpfl(["config", "--write", "--root", str(tmp_path)]) == 0
    assert pyproject.read_text() == (REPO / "pyproject.toml").read_text()
    assert dpfl(["config", "--check", "--root", str(tmp_path)]) == 0


def test_a_checkout_without_the_files_is_a_one_line_error(tmp_path, capsys):
    assert dpfl(["config", "--check", "--root", str(tmp_path)]) == 2
    assert "run this from the dpfl source checkout" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_it_quietly():
    """`dpfl config | head -1`: the closed pipe is the reader's choice, not an error with a traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # before the interpreter has even started: every write hits a closed pipe
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""
    process.stderr.close()
