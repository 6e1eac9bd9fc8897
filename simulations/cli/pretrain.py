"""`dpfl pretrain-public`: pre-train the font CNN on rendered digits, public data only.

`register` adds the command to the `dpfl` parser; the pipeline lives in
`simulations.pretrain`, imported only when the command runs (it loads torch and renders
fonts). The package ships the result; this command reproduces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Register `dpfl pretrain-public` on the `dpfl` parser."""
    cmd = commands.add_parser(
        "pretrain-public",
        help="render the installed fonts' digits and pre-train the font CNN of scatnet+fonts (no MNIST)",
    )
    cmd.add_argument("--out", type=Path, help="directory for font-cnn-weights.json and font-cnn.json (default: outputs/pretrain-<time>)")
    cmd.add_argument("--images", type=int, help="synthetic training images (default: the recipe's)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the font split, augmentation and initialisation")
    cmd.add_argument(
        "--font-dir", action="append", default=[], help="where fonts are installed (repeatable; default /usr/share/fonts)"
    )
    cmd.add_argument("--max-fonts", type=int, default=0, help="use an evenly spaced subset of the font files (0: all)")
    cmd.add_argument(
        "--install", action="store_true", help="then copy the result over the shipped weights (common/weights/)"
    )
    cmd.set_defaults(handler=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from common.public_features import MANIFEST_FILE, WEIGHTS_DIR, WEIGHTS_FILE
    from simulations.pretrain import FONT_DIRS, Recipe, pretrain

    recipe = Recipe(seed=args.seed)
    if args.images:
        recipe = dataclasses.replace(recipe, images=args.images)
    out = args.out or Path("outputs") / f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    manifest = pretrain(out, recipe, args.font_dir or FONT_DIRS, args.max_fonts, progress=sys.stderr.isatty())
    fonts = manifest["fonts"]
    print(
        f"{len(fonts['training'])} training and {len(fonts['held-out'])} held-out fonts; "
        f"{manifest['training-images']:,} images in {manifest['seconds']['training']:.0f} s; "
        f"held-out fonts accuracy {100 * manifest['held-out-fonts-accuracy']:.2f}%"
    )
    print(f"-> {out}")
    if args.install:
        WEIGHTS_DIR.mkdir(exist_ok=True)
        for name in (WEIGHTS_FILE.name, MANIFEST_FILE.name):
            shutil.copyfile(out / name, WEIGHTS_DIR / name)
        print(f"installed into {WEIGHTS_DIR}")
    return 0
