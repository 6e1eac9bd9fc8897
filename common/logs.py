"""dpfl's log lines on the terminal, and each run's whole log in `run.log` in its run directory.

The terminal (stdout) shows dpfl's own lines: the run directory, one line per round,
refusals and other warnings, the summary. Flower configures only its own `flwr` logger;
ours would otherwise be silent below WARNING. Under `flwr run` stdout is what Flower
streams back to the user, so the same lines reach them.

While a simulation runs (`RunLog`), what the libraries print (Flower's banner, round log
and deprecation notices, Ray's driver messages, Python warnings from Opacus, torch and
Ray, the Ray workers' output) goes to `run.log` together with dpfl's lines, so nothing is
lost and the terminal keeps to what a user reads; `verbose` leaves the libraries' own
output on the terminal as well. Warnings that bear on privacy are set aside
(`PrivacyWarnings`) so that the run can state each once and record it in its summary.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

PACKAGES = ("common", "client", "server", "simulations")
RUN_LOG_FILE = "run.log"
#: The loggers of the libraries a simulation runs on, and of Python's warnings.
LIBRARIES = ("flwr", "ray", "opacus", "py.warnings")
#: Where the Ray workers' stdout and stderr go, once the engine has read them.
WORKERS = "ray-workers"
RUN_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: A warning as Python prints it: `path:line: Category: message`.
_PYTHON_WARNING = re.compile(r"^(?P<path>\S.*?):(?P<line>\d+): (?P<category>\w+): (?P<message>.+)$")
#: Opacus' RDP analysis says its epsilon could be tighter with more orders: the figure is an
#: upper bound either way (the PRV accountant only sizes its grid with it), so no risk to report.
_TIGHTNESS_NOTE = "Optimal order is the largest alpha"
_PRIVACY_WORDS = re.compile(r"\b(privacy|private|secure|epsilon|differential)", re.IGNORECASE)


class TerminalHandler(logging.Handler):
    """Writes records to the current stdout, and through tqdm once it is loaded.

    tqdm clears its bars (the round in flight, on stderr) before the line and redraws them
    after, so a line never cuts through a bar; the stream is looked up at each record, so
    a redirected stdout gets the lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:
                tqdm.tqdm.write(text, file=sys.stdout)
            else:
                sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except Exception:  # logging's contract: a handler reports its failure, never raises it
            self.handleError(record)


def enable_logging(level: int = logging.INFO) -> None:
    """Print dpfl's log records at `level` and above to stdout; safe to call repeatedly."""
    for package in PACKAGES:
        logger = logging.getLogger(package)
        logger.setLevel(level)
        logger.propagate = False
        if not logger.handlers:
            handler = TerminalHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)


class PrivacyWarnings(logging.Handler):
    """The warnings of a run that bear on privacy, each once, in the order they came.

    Every Python warning raised inside Opacus counts (its warnings concern the DP mechanism
    and its accounting: the secure RNG, the accountant's orders, sampling), and any other
    warning, or library log line at WARNING or above, that speaks of privacy, security or
    epsilon. dpfl's own warnings are on the terminal already and are not repeated.
    Python warnings come in as `py.warnings` records (the driver's) or inside the Ray
    workers' output (`WORKERS`), in the format Python prints them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._found: dict[str, None] = {}

    @property
    def found(self) -> list[str]:
        return list(self._found)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in PACKAGES:
            return
        text = record.getMessage()
        if record.name in ("py.warnings", WORKERS):
            for line in text.splitlines():
                self._python_warning(line)
        elif record.levelno >= logging.WARNING and _PRIVACY_WORDS.search(text):
            self._found.setdefault(f"{record.name}: {text.splitlines()[0]}")

    def _python_warning(self, line: str) -> None:
        match = _PYTHON_WARNING.match(line)
        if match is None:
            return
        path, message = match["path"], match["message"]
        package_path = path.split("site-packages/")[-1] if "site-packages/" in path else Path(path).name
        if message.startswith(_TIGHTNESS_NOTE):
            return
        if package_path.startswith("opacus/") or _PRIVACY_WORDS.search(message):
            self._found.setdefault(f"{package_path}:{match['line']}: {match['category']}: {message}")


class _Fanout(logging.Handler):
    """The one handler a run attaches to every logger it routes: to run.log and to the privacy watch.

    Ray's `ray.init` sets its own format on every handler of the `ray` logger; it lands on
    this handler, which formats nothing, and run.log keeps one format.
    """

    def __init__(self, *targets: logging.Handler) -> None:
        super().__init__()
        self.targets = targets

    def emit(self, record: logging.LogRecord) -> None:
        for target in self.targets:
            target.handle(record)


class RunLog:
    """One run's log routing, from `with RunLog(...)` to its end; nothing of it outlives the run.

    Inside, dpfl's loggers, the libraries' (`LIBRARIES`), Python's warnings and the workers'
    output (`add_worker_output`) all reach `path` (opened for appending: a resumed run goes
    on with its log). The terminal keeps dpfl's lines only, unless `verbose`: then the
    libraries' own handlers and Python's warning printer stay as they were. Handlers,
    levels and warning filters are restored on exit, so that every run of a sweep gets its
    own log and nothing piles up.
    """

    def __init__(self, path: Path, verbose: bool = False) -> None:
        self.path = Path(path)
        self.verbose = verbose
        self.privacy = PrivacyWarnings()
        self._file: logging.FileHandler | None = None
        self._fanout: _Fanout | None = None
        self._saved: list[tuple[logging.Logger, list[logging.Handler], int, bool]] = []
        self._warnings: warnings.catch_warnings | None = None

    def __enter__(self) -> RunLog:
        self._file = logging.FileHandler(self.path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(RUN_LOG_FORMAT))
        self._fanout = _Fanout(self._file, self.privacy)
        for name in (*PACKAGES, *LIBRARIES, WORKERS):
            logger = logging.getLogger(name)
            self._saved.append((logger, list(logger.handlers), logger.level, logger.propagate))
            if name in PACKAGES:
                if logger.getEffectiveLevel() > logging.INFO:  # enable_logging has not run: still log to run.log
                    logger.setLevel(logging.INFO)
            elif not self.verbose:
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                logger.propagate = False
            if name in ("py.warnings", WORKERS):  # on the terminal already when verbose: Python's printer, Ray's
                logger.propagate = False
                logger.setLevel(logging.INFO)
            logger.addHandler(self._fanout)
        # Python's own save and restore of the warning machinery; entering it also lets every
        # warning show once more in this run, though an earlier run in this process showed it.
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.showwarning = self._show_warning(warnings.showwarning)
        return self

    def _show_warning(self, printer: Callable[..., None]) -> Callable[..., None]:
        """Python's `showwarning`, logging each warning to `py.warnings` (and printing it as before when verbose)."""
        logger = logging.getLogger("py.warnings")

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            logger.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))
            if self.verbose:
                printer(message, category, filename, lineno, file, line)

        return show

    def add_worker_output(self, worker: str, text: str) -> None:
        """Log what a Ray worker wrote (`worker` names it), for run.log and the privacy watch."""
        logging.getLogger(WORKERS).info("%s:\n%s", worker, text.rstrip("\n"))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._warnings is not None:
            self._warnings.__exit__(kind, error, traceback)
        for logger, handlers, level, propagate in reversed(self._saved):
            logger.removeHandler(self._fanout)
            for handler in handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved.clear()
        if self._file is not None:
            self._file.close()
