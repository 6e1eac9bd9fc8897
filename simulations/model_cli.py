"""`dpfl export` and `dpfl predict`: take a trained model from a run directory to use.

`add_commands` registers both on the `dpfl` parser; the work lives in `server.export`.
"""

from __future__ import annotations

import argparse
from pathlib import Path



def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `export` and `predict` on the `dpfl` sub-command parser."""
    export = commands.add_parser(
        "export",
        help="export a run's model to TorchScript (and ONNX) and report its size and CPU latency",
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
    export.set_defaults(handler=_cmd_export)

    predict_cmd = commands.add_parser(
        "predict", help="classify images of handwritten digits (PNG, JPEG)"
    )
    predict_cmd.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="a run directory, its model.pt or a model.torchscript.pt from `dpfl export`",
    )
    predict_cmd.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="digit images")
    predict_cmd.set_defaults(handler=_cmd_predict)


def _cmd_export(args: argparse.Namespace) -> int:
    from server.export import LATENCY_RUNS, export_model  # torch and friends: only when used

    report = export_model(args.model, args.out)
    rows = [("parameters", f"{report.parameters:,}")]
    rows += [(name, f"{size:,} bytes") for name, size in report.file_bytes.items()]
    rows += [(f"latency {name}", f"{ms:.3f} ms") for name, ms in report.latency_ms.items()]
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    print(f"exported to {report.out_dir}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>{value_width}}")
    print(f"  (latency: median of {LATENCY_RUNS} single-image runs on one CPU thread)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from server.export import load_predictor, predict

    model = load_predictor(args.model)
    for path, prediction in zip(args.images, predict(model, args.images), strict=True):
        print(f"{path}: digit {prediction.digit} (p={prediction.probability:.3f})")
    return 0
