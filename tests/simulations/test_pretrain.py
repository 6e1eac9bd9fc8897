"""Pre-training on public fonts: rendering, filters, and that no MNIST is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen

import common.data
from common.public_features import MANIFEST_FILE, WEIGHTS_FILE, extractor_keys, read_weights
from simulations.pretrain import (
    BOX,
    FONT_DIRS,
    IMAGE,
    Recipe,
    clean_images,
    feature_statistics,
    find_fonts,
    glyph_bank,
    pretrain,
    sample,
    typical,
)

DIGITS = "0123456789"


def _glyph(digit: int):
    """A distinct outline per digit: a box with a notch whose place and size depend on the digit."""
    pen = TTGlyphPen(None)
    width, height = 300 + 20 * digit, 700
    pen.moveTo((0, 0)), pen.lineTo((0, height)), pen.lineTo((width, height)), pen.lineTo((width, 0)), pen.closePath()
    notch = 40 + 50 * digit
    pen.moveTo((60, 60 + notch)), pen.lineTo((width - 60, 60 + notch)), pen.lineTo((width - 60, 120 + notch)), pen.lineTo((60, 120 + notch)), pen.closePath()
    return pen.glyph()


def make_font(path: Path, family: str, digits: str = DIGITS) -> Path:
    """A minimal TrueType font holding `digits` only."""
    names = [".notdef", *(f"d{d}" for d in digits)]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(d): f"d{d}" for d in digits})
    glyphs = {".notdef": TTGlyphPen(None).glyph(), **{f"d{d}": _glyph(int(d)) for d in digits}}
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({name: (500, 0) for name in names})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    builder.save(str(path))
    return path


def test_clean_renders_are_mnist_style(tmp_path):
    bank = glyph_bank([make_font(tmp_path / "a.ttf", "A")])
    images = (clean_images(bank.glyphs[0]) * 255).round().to(torch.uint8)
    assert images.shape == (10, IMAGE, IMAGE) and images.dtype == torch.uint8
    rows, cols = torch.meshgrid(torch.arange(IMAGE) + 0.5, torch.arange(IMAGE) + 0.5, indexing="ij")
    for image in images.float():
        mass = image.sum()
        assert abs((image * rows).sum() / mass - IMAGE / 2) < 0.5 and abs((image * cols).sum() / mass - IMAGE / 2) < 0.5
        ink = image > 0
        height, width = int(ink.any(1).sum()), int(ink.any(0).sum())
        assert BOX - 1 <= max(height, width) <= BOX + 2  # the longer side fit into the 20 px box


def test_filters_drop_a_font_missing_a_digit_and_duplicates(tmp_path):
    kept = make_font(tmp_path / "a.ttf", "A")
    missing = make_font(tmp_path / "b.ttf", "B", digits=DIGITS.replace("7", ""))
    copy = make_font(tmp_path / "c.ttf", "C")
    bank = glyph_bank([kept, missing, copy])
    assert [font.path for font in bank.fonts] == [str(kept)]
    assert bank.dropped["missing digits"] == [str(missing)] and bank.dropped["duplicate digits"] == [str(copy)]


def test_nearest_centroid_drops_atypical_fonts():
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, IMAGE, IMAGE, generator=generator)
    fonts = prototypes + 0.2 * torch.rand(12, 10, IMAGE, IMAGE, generator=generator)
    fonts[5] = fonts[5][torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])]  # a face whose digits look like others
    assert typical(fonts).tolist() == [i != 5 for i in range(12)]


def test_augmentation_is_seeded(tmp_path):
    bank = glyph_bank([make_font(tmp_path / "a.ttf", "A")])
    first, labels = sample(bank, [0], 16, Recipe(), torch.Generator().manual_seed(1))
    second, _ = sample(bank, [0], 16, Recipe(), torch.Generator().manual_seed(1))
    assert first.shape == (16, 1, IMAGE, IMAGE) and torch.equal(first, second) and labels.max() < 10
    assert float(first.amin()) >= 0 and float(first.amax()) <= 1


def test_the_shipped_manifest_describes_the_shipped_weights():
    manifest = json.loads(MANIFEST_FILE.read_text())
    assert manifest["weights-sha256"] == hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest()
    assert len(manifest["fonts"]["training"]) >= 500 and manifest["held-out-fonts-accuracy"] > 0.9
    assert "MNIST" not in json.dumps(manifest["fonts"])


@pytest.mark.slow
def test_a_short_pretraining_learns_from_fonts_alone(tmp_path, monkeypatch):
    """Regenerate a tiny pre-training with every MNIST loader made to fail: it must not need
    one, must learn above chance on held-out fonts, and its standardisation statistics must
    be those of synthetic images."""

    def forbidden(*args, **kwargs):
        raise AssertionError("pre-training read MNIST")

    for name in ("load_mnist", "load_dataset", "load_validation", "client_shard"):
        monkeypatch.setattr(common.data, name, forbidden)
    monkeypatch.setattr("torchvision.datasets.MNIST", forbidden)
    recipe = Recipe(seed=3, images=4096, batch_size=128, statistics_images=512, held_out_fraction=0.2)
    manifest = pretrain(tmp_path, recipe, max_fonts=120)
    assert manifest["held-out-fonts-accuracy"] > 0.5 and manifest["fonts"]["held-out"]
    assert manifest["recipe"]["seed"] == 3 and manifest["training-images"] == 4096
    tensors = read_weights(tmp_path / WEIGHTS_FILE.name)
    assert list(tensors) == extractor_keys()
    # The statistics are recomputed from the same synthetic images: the same seed regenerates them.
    paths = find_fonts(FONT_DIRS)
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, 120).round().astype(int)]
    bank = glyph_bank(paths)
    images, _ = sample(bank, list(range(len(bank.fonts))), 512, recipe, torch.Generator().manual_seed(recipe.seed + 3))
    mean, std = feature_statistics(tensors, images)
    torch.testing.assert_close(tensors["feature_mean"], mean)
    torch.testing.assert_close(tensors["feature_std"], std)
