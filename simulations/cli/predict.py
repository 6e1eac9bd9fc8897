"""`dpfl predict`: classify digit images with a trained or exported model.

`register` adds the command to the `dpfl` parser; the work lives in `common.export`,
imported only when the command runs (it loads torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Register `predict` on the `dpfl` sub-command parser."""
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


def _cmd_predict(args: argparse.Namespace) -> int:
    from common.export import load_predictor, predict

    model = load_predictor(args.model)
    for path, prediction in zip(args.images, predict(model, args.images), strict=True):
        print(f"{path}: digit {prediction.digit} (p={prediction.probability:.3f})")
    return 0
