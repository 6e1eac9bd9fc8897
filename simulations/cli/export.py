"""`dpfl export`: take a trained model from a run directory to self-contained files.

`register` adds the command to the `dpfl` parser; the work lives in `common.export`,
imported only when the command runs (it loads torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Register `export` on the `dpfl` sub-command parser."""
    export = commands.add_parser(
        "export",
        help="export a run's model to TorchScript (and ONNX) with a model card; report its size and CPU latency",
    )
    export.add_argument(
        "model",
        type=Path,
        metavar="RUN_DIR_OR_MODEL_PT",
        help="a run directory or its model.pt",
    )
    export.add_argument(
        "--out", type=Path, metavar="DIR", help="where to write the exports (default: beside it)"
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 ONNX variant, kept if its MNIST test accuracy is within 0.1 points",
    )
    export.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from common.export import LATENCY_RUNS, export_model  # torch and friends: only when used

    report = export_model(args.model, args.out, int8=args.int8)
    rows = [("parameters", f"{report.parameters:,}")]
    rows += [(name, f"{size:,} bytes") for name, size in report.file_bytes.items()]
    rows += [(f"latency {name}", f"{ms:.3f} ms") for name, ms in report.latency_ms.items()]
    rows += [(f"test accuracy {name}", f"{100 * value:.2f} %") for name, value in report.accuracy.items()]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    print(f"exported to {report.out_dir}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>{value_width}}")
    print(f"  (latency: median of {LATENCY_RUNS} single-image runs on one CPU thread)")
    for note in report.notes:
        print(f"  {note}")
    return 0
