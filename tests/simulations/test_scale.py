"""`dpfl bench --scale`: the peak memory of a whole process tree, read from /proc."""

import os
import subprocess
import sys
import time

from simulations.scale import PeakMemory, _descendants
from tests.simulations.test_simulate import run_cli

HOLD_MIB = 200


def test_peak_memory_counts_the_children_of_the_process():
    child = subprocess.Popen(
        [sys.executable, "-c", f"import time; block = bytearray({HOLD_MIB} * 2**20); time.sleep(30)"]
    )
    try:
        time.sleep(1.0)  # let it allocate
        with PeakMemory() as memory:
            time.sleep(1.2)
        assert child.pid in _descendants(os.getpid())
        assert memory.processes >= 2
        assert memory.rss_mib > HOLD_MIB and memory.pss_mib > HOLD_MIB * 0.9
    finally:
        child.kill()
        child.wait()


def test_bad_client_counts_are_one_line_errors():
    result = run_cli("bench", "--scale", "10,lots")
    assert result.returncode == 2 and "give client counts like 10,100,1000" in result.stderr
    assert "Traceback" not in result.stderr
