"""How a simulation's time and memory grow with the number of clients (`dpfl bench --scale`).

Memory is the whole simulation's: this process plus every descendant (Ray's GCS, raylet and
the client actors), sampled from Linux's /proc while the run goes on. Summed RSS counts the
libraries every worker maps (torch alone is hundreds of MB) once per process; summed PSS
shares them out, so it is what the simulation really occupies. Both are reported.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data import load_labels, resolve_data_dir
from simulations.presets import load_preset

SAMPLE_SECONDS = 0.5


def _descendants(root: int) -> list[int]:
    """`root` and every process below it, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in field 2 may hold spaces; the parent id follows its ')'.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, or zeros if it is gone."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
        )
        return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


@dataclass
class PeakMemory:
    """The largest summed RSS and PSS of a process tree, sampled in a background thread."""

    rss_mib: float = 0.0
    pss_mib: float = 0.0
    processes: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            tree = _descendants(os.getpid())
            rss, pss = map(sum, zip(*(_memory_kib(pid) for pid in tree), strict=True))
            self.rss_mib = max(self.rss_mib, rss / 1024)
            self.pss_mib = max(self.pss_mib, pss / 1024)
            self.processes = max(self.processes, len(tree))
            if self._stop.wait(SAMPLE_SECONDS):
                return


def scale(preset: str | None, overrides: list[str], client_counts: list[int]) -> list[dict[str, Any]]:
    """One simulation per client count, over the same training images; time and peak memory of each."""
    from simulations.engine import simulate

    rows = []
    for clients in client_counts:
        config = load_preset(preset, [*overrides, f"num-clients={clients}"])
        start = time.perf_counter()
        with PeakMemory() as memory:
            summary = simulate(config)
        rows.append(
            {
                "clients": clients,
                "shard-size": _examples(config) // clients,
                "rounds": summary["rounds-completed"],
                "seconds": time.perf_counter() - start,
                "peak-rss-mib": memory.rss_mib,
                "peak-pss-mib": memory.pss_mib,
                "processes": memory.processes,
                "test-accuracy": summary["test-accuracy"],
                "epsilon": summary["epsilon"],
            }
        )
    return rows


def _examples(config: RunConfig) -> int:
    """The images the clients share: from the config for MNIST, from the files for a user's data set."""
    known = config.total_train_examples()
    return known if known is not None else len(load_labels(config.data.dataset, resolve_data_dir(config.data.data_dir)))
