"""How a simulation's time and memory grow with the number of clients (`dpfl bench --scale`).

Memory is the whole simulation's: this process plus every descendant (Ray's GCS, raylet and
the client actors), sampled from Linux's /proc while the run goes on. Summed RSS counts the
libraries every worker maps (torch alone is hundreds of MB) once per process; summed PSS
shares them out, so it is what the simulation really occupies. Both are reported.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data import load_labels, resolve_data_dir
from server.results import ROUNDS_FILE
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


def _kind(pid: int) -> str:
    """What a process is, for the per-process breakdown: `driver` (this one), a Ray actor's or
    worker's name (`ray::ClientAppActor`), or the program's file name (`raylet`, `gcs_server`)."""
    if pid == os.getpid():
        return "driver"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(".", 1)[0].split(" ", 1)[0]
    if Path(first).name.startswith("python") and len(argv) > 1:  # a Python helper: name its script
        first = next((arg.decode(errors="replace") for arg in argv[1:] if arg.endswith(b".py")), first)
    return Path(first).name


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
    #: Per kind of process (`_kind`), the largest PSS its processes held together.
    pss_mib_by_kind: dict[str, float] = field(default_factory=dict)

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
            memory = {pid: _memory_kib(pid) for pid in tree}
            self.rss_mib = max(self.rss_mib, sum(rss for rss, _ in memory.values()) / 1024)
            self.pss_mib = max(self.pss_mib, sum(pss for _, pss in memory.values()) / 1024)
            self.processes = max(self.processes, len(tree))
            kinds: dict[str, float] = {}
            for pid, (_, pss) in memory.items():
                kind = _kind(pid)
                kinds[kind] = kinds.get(kind, 0.0) + pss / 1024
            for kind, mib in kinds.items():
                self.pss_mib_by_kind[kind] = max(self.pss_mib_by_kind.get(kind, 0.0), mib)
            if self._stop.wait(SAMPLE_SECONDS):
                return


def scale(
    preset: str | None, overrides: list[str], client_counts: list[int], shard_size: int | None = None
) -> list[dict[str, Any]]:
    """One simulation per client count; time and peak memory of each.

    All over the same training images, or, with `shard_size`, over that many images per
    client (`train-subset`), so that every run's clients are alike and the difference
    between runs is the cost of more of them.
    """
    from simulations.engine import simulate

    rows = []
    for clients in client_counts:
        subset = [f"train-subset={shard_size * clients}"] if shard_size else []
        config = load_preset(preset, [*overrides, *subset, f"num-clients={clients}"])
        start = time.perf_counter()
        with PeakMemory() as memory:
            summary = simulate(config)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "clients": clients,
                "shard-size": _examples(config) // clients,
                "rounds": summary["rounds-completed"],
                "seconds": seconds,
                # Phases: Ray's start-up and the first round's fixed features fall in round 1.
                "round-seconds": _round_seconds(Path(summary["run-dir"])),
                "marginal-ms-per-client-round": _marginal_ms(rows[0], clients, seconds, summary) if rows else None,
                "peak-rss-mib": memory.rss_mib,
                "peak-pss-mib": memory.pss_mib,
                "peak-pss-mib-by-process": dict(sorted(memory.pss_mib_by_kind.items(), key=lambda kv: -kv[1])),
                "processes": memory.processes,
                "test-accuracy": summary["test-accuracy"],
                "epsilon": summary["epsilon"],
            }
        )
    return rows


def _round_seconds(run_dir: Path) -> list[float]:
    """Each round's wall time, from the cumulative seconds in the run's rounds.csv."""
    with (run_dir / ROUNDS_FILE).open(newline="") as f:
        elapsed = [float(row["seconds"]) for row in csv.DictReader(f)]
    return [after - before for before, after in zip([0.0, *elapsed], elapsed)]


def _marginal_ms(first: dict[str, Any], clients: int, seconds: float, summary: dict[str, Any]) -> float | None:
    """What each client-round beyond the first (smallest) run's cost: the extra time over the extra client-rounds."""
    extra = (clients - first["clients"]) * summary["rounds-completed"]
    return 1000 * (seconds - first["seconds"]) / extra if extra > 0 else None


def _examples(config: RunConfig) -> int:
    """The images the clients share: from the config for MNIST, from the files for a user's data set."""
    known = config.total_train_examples()
    return known if known is not None else len(load_labels(config.data.dataset, resolve_data_dir(config.data.data_dir)))
