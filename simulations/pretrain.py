"""Pre-training on public data: digits rendered from fonts, a small CNN, its frozen features.

The pipeline (`dpfl pretrain-public`):

1. **Fonts**: every TrueType / OpenType file under the font directories (Debian's font
   packages install them in /usr/share/fonts; docs/public-data.md lists the packages).
2. **Filters**, on the fonts alone: a font whose character map lacks a digit, whose digits
   render empty or alike (symbol and icon fonts, .notdef boxes), that duplicates another
   font's digits exactly, or whose digits a nearest-centroid check over all fonts calls
   atypical (decorative faces), is dropped.
3. **Rendering and augmentation**: each kept font's clean digits, rendered once at high
   resolution, are distorted on the fly in batches (stroke thickness by a level set of
   the blurred glyph, rotation, slant, squeeze, elastic distortion, blur, noise) and normalised as
   MNIST was made: fit into a 20 x 20 box, centre of mass at the centre of 28 x 28.
4. **Pre-training**: a five-layer CNN with BatchNorm, on fonts split by family into training
   and held-out fonts; its accuracy on the held-out fonts is reported.
5. **Export**: BatchNorm folded into the convolutions, the standardisation statistics of
   its 128-d features computed over synthetic images, written with a manifest.

No MNIST image or statistic is read anywhere here: the data is public, so the result costs
no privacy (`common.public_features`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm import tqdm

from common.public_features import CHANNELS, FEATURES, POOL_AFTER, extract

log = logging.getLogger(__name__)
logging.getLogger("fontTools").setLevel(logging.ERROR)  # it warns about harmless table quirks of many fonts

FONT_DIRS = ("/usr/share/fonts",)
FONT_SUFFIXES = (".ttf", ".otf")
DIGITS = "0123456789"
#: Clean glyphs are rendered at this size, their longer side fit into GLYPH_BOX of a MASTER square.
RENDER_SIZE, MASTER, GLYPH_BOX = 96, 64, 44
#: As MNIST: the digit's longer side fit into 20 px, centre of mass at the centre of 28 x 28.
IMAGE, BOX = 28, 20
#: A font is atypical when the nearest-centroid check names fewer of its ten digits right.
MIN_TYPICAL_DIGITS = 8


@dataclass(frozen=True)
class Recipe:
    """Everything a pre-training run depends on besides the installed fonts."""

    seed: int = 0
    images: int = 128_000
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    dropout: float = 0.3
    held_out_fraction: float = 0.1
    held_out_images_per_glyph: int = 4
    statistics_images: int = 20_000
    max_rotation_degrees: float = 17.0
    max_slant: float = 0.35
    squeeze: tuple[float, float] = (0.6, 1.1)
    thickness_levels: tuple[float, float] = (0.15, 0.65)
    elastic_pixels: float = 3.0
    max_blur: float = 1.0
    max_noise: float = 0.08


@dataclass(frozen=True)
class Font:
    """A font file and the family name it declares (held-out fonts are split by family)."""

    path: str
    family: str


@dataclass(frozen=True)
class GlyphBank:
    """The clean digits of the kept fonts: `glyphs[f, d]` is font f's digit d, (MASTER, MASTER) in [0, 1]."""

    fonts: list[Font]
    glyphs: torch.Tensor
    dropped: dict[str, list[str]]


# ---- fonts and filters ---------------------------------------------------------------


def find_fonts(directories: Iterable[str | Path] = FONT_DIRS) -> list[Path]:
    """Every TrueType / OpenType file under `directories`, sorted so runs see the same order."""
    found = {
        path.resolve()
        for directory in directories
        for path in Path(directory).rglob("*")
        if path.suffix.lower() in FONT_SUFFIXES and path.is_file()
    }
    return sorted(found)


def has_all_digits(path: Path) -> bool:
    """Whether the font's character map has all ten digits (else they render as .notdef boxes)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # an unreadable or exotic file is simply not used
        return False
    return all(ord(digit) in cmap for digit in DIGITS)


def render_digit(font: ImageFont.FreeTypeFont, digit: str) -> np.ndarray | None:
    """`digit` in `font`, cropped to its ink and fit (aspect kept) into GLYPH_BOX of a MASTER square, in [0, 1]; None if empty."""
    canvas = Image.new("L", (3 * RENDER_SIZE, 3 * RENDER_SIZE), 0)
    ImageDraw.Draw(canvas).text((1.5 * RENDER_SIZE, 1.5 * RENDER_SIZE), digit, fill=255, font=font, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    scale = GLYPH_BOX / max(glyph.size)
    size = (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    master = Image.new("L", (MASTER, MASTER), 0)
    master.paste(glyph, ((MASTER - size[0]) // 2, (MASTER - size[1]) // 2))
    return np.asarray(master, dtype=np.float32) / 255.0


def render_font(path: Path) -> tuple[Font, np.ndarray] | str:
    """A font's ten clean digits (10, MASTER, MASTER), or why it is dropped."""
    if not has_all_digits(path):
        return "missing digits"
    try:
        font = ImageFont.truetype(str(path), RENDER_SIZE)
        family = font.getname()[0] or path.stem
        glyphs = [render_digit(font, digit) for digit in DIGITS]
    except OSError:
        return "unreadable"
    if any(glyph is None for glyph in glyphs):
        return "empty digits"
    stack = np.stack(glyphs)
    flat = stack.reshape(10, -1)
    distances = np.abs(flat[:, None] - flat[None]).mean(-1) + np.eye(10)
    if distances.min() < 0.01:  # two digits alike: boxes, or a symbol font's repeated shape
        return "digits alike"
    return Font(str(path), family), stack


def mnist_style(masters: torch.Tensor) -> torch.Tensor:
    """Images (N, 1, H, W) in [0, 1] normalised as MNIST's: the ink's bounding box fit
    (aspect kept) into BOX x BOX, shifted so the centre of mass is at the centre of
    IMAGE x IMAGE; (N, 1, IMAGE, IMAGE). The map from source to output is affine, so the
    centre of mass is taken on the source; resampled at twice the size and averaged down,
    which anti-aliases as MNIST's own normalisation did."""
    n, _, height, width = masters.shape
    ink = masters[:, 0] > 0.1
    rows, cols = ink.any(2), ink.any(1)
    empty = ~rows.any(1)
    rows[empty, height // 2], cols[empty, width // 2] = True, True

    def span(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(size, dtype=torch.float32)
        first = torch.where(mask, index, torch.full_like(index, size)).amin(1)
        last = torch.where(mask, index, torch.full_like(index, -1)).amax(1)
        return first, last + 1

    top, bottom = span(rows, height)
    left, right = span(cols, width)
    # In normalised source coordinates ([-1, 1], align_corners=False): the box's half-extent
    # and the centre of mass, which lands at the output's centre.
    half = torch.maximum((right - left) / width, (bottom - top) / height)
    weights = masters[:, 0]
    mass = weights.sum((1, 2)).clamp_min(1e-6)
    centre_x = (weights.sum(1) * ((torch.arange(width) + 0.5) / width * 2 - 1)).sum(1) / mass
    centre_y = (weights.sum(2) * ((torch.arange(height) + 0.5) / height * 2 - 1)).sum(1) / mass
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = half * (IMAGE / BOX)  # the output's [-1, 1] spans IMAGE / BOX box halves
    theta[:, 0, 2], theta[:, 1, 2] = centre_x, centre_y
    grid = F.affine_grid(theta, [n, 1, 2 * IMAGE, 2 * IMAGE], align_corners=False)
    return F.avg_pool2d(F.grid_sample(masters, grid, align_corners=False), 2).clamp_(0, 1)


def clean_images(glyphs: torch.Tensor) -> torch.Tensor:
    """Undistorted MNIST-style renders of glyphs (..., MASTER, MASTER): (..., IMAGE, IMAGE)."""
    shape = glyphs.shape[:-2]
    return mnist_style(glyphs.reshape(-1, 1, MASTER, MASTER)).reshape(*shape, IMAGE, IMAGE)


def typical(images: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """Which fonts' digits look like digits: nearest-centroid over the fonts themselves.

    `images` (F, 10, IMAGE, IMAGE) are clean renders. Each digit's centroid is the mean of
    the fonts kept so far; a font is kept when at least MIN_TYPICAL_DIGITS of its digits are
    nearest their own centroid. Repeated, so decorative faces stop pulling the centroids.
    """
    flat = images.flatten(2)
    flat = flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-6)
    keep = torch.ones(len(images), dtype=torch.bool)
    for _ in range(rounds):
        centroids = flat[keep].mean(0)  # (10, pixels)
        nearest = torch.cdist(flat, centroids.expand(len(flat), -1, -1)).argmin(2)  # (F, 10)
        keep = (nearest == torch.arange(10)).sum(1) >= MIN_TYPICAL_DIGITS
    return keep


def glyph_bank(paths: Sequence[Path], progress: bool = False) -> GlyphBank:
    """Render and filter `paths`: the kept fonts' clean digits, and the dropped ones by reason."""
    dropped: dict[str, list[str]] = {}
    fonts: list[Font] = []
    stacks: list[np.ndarray] = []
    seen: set[str] = set()
    for path in tqdm(paths, desc="rendering fonts", disable=not progress, leave=False):
        rendered = render_font(path)
        if isinstance(rendered, str):
            dropped.setdefault(rendered, []).append(str(path))
            continue
        font, stack = rendered
        digest = hashlib.sha256(np.round(stack * 255).astype(np.uint8).tobytes()).hexdigest()
        if digest in seen:
            dropped.setdefault("duplicate digits", []).append(str(path))
            continue
        seen.add(digest)
        fonts.append(font)
        stacks.append(stack)
    if not stacks:
        raise ValueError("no usable font: install fonts with all ten digits (docs/public-data.md)")
    glyphs = torch.from_numpy(np.stack(stacks))
    keep = typical(clean_images(glyphs))
    dropped["atypical digits"] = [font.path for font, kept in zip(fonts, keep.tolist()) if not kept]
    return GlyphBank([font for font, kept in zip(fonts, keep.tolist()) if kept], glyphs[keep], dropped)


def split_fonts(fonts: Sequence[Font], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and held-out fonts; all fonts of a family fall on the same side,
    so held-out accuracy measures new designs, not a new weight of a seen one."""
    families = sorted({font.family for font in fonts})
    order = np.random.default_rng(seed).permutation(len(families))
    held = {families[i] for i in order[: max(1, round(fraction * len(families)))]} if len(families) > 1 else set()
    train = [i for i, font in enumerate(fonts) if font.family not in held]
    return train, [i for i, font in enumerate(fonts) if font.family in held]


# ---- augmentation ----------------------------------------------------------------------


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of every image of `x` (N, 1, H, W), zero outside: B x B^T with a banded
    matrix B, which runs as matrix products, far faster on CPU than a one-channel convolution."""
    size = x.shape[-1]
    offsets = torch.arange(size, dtype=torch.float32)
    band = torch.exp(-((offsets[:, None] - offsets[None]) ** 2) / (2 * sigma**2))
    band = band / band.sum(1, keepdim=True)
    return band @ x @ band.T


def augment(glyphs: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random distortions of clean glyphs (N, MASTER, MASTER), MNIST-normalised: (N, 1, IMAGE, IMAGE) in [0, 1]."""
    n = len(glyphs)

    def uniform(low: float, high: float, size: int = n) -> torch.Tensor:
        return low + (high - low) * torch.rand(size, generator=generator)

    x = glyphs[:, None].float()
    # Stroke thickness: a level set of the blurred glyph, relative to its peak; lower is bolder.
    blurred = _gaussian(x, 2.0)
    peak = blurred.amax((2, 3), keepdim=True).clamp_min(1e-6)
    level = uniform(*recipe.thickness_levels)[:, None, None, None]
    x = ((blurred / peak - level) / 0.2 + 0.5).clamp_(0, 1)  # zero where blurred is 0: level >= 0.1
    angle = torch.deg2rad(uniform(-recipe.max_rotation_degrees, recipe.max_rotation_degrees))
    slant = uniform(-recipe.max_slant, recipe.max_slant)
    squeeze = uniform(*recipe.squeeze)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output -> source: rotate, slant (x += slant * y), squeeze horizontally (source x / squeeze).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / squeeze
    theta[:, 0, 1] = (slant * cos - sin) / squeeze
    theta[:, 1, 0] = sin
    theta[:, 1, 1] = slant * sin + cos
    grid = F.affine_grid(theta, [n, 1, MASTER, MASTER], align_corners=False)
    coarse = torch.randn(n, 2, 4, 4, generator=generator) * (2 * recipe.elastic_pixels / MASTER)
    elastic = F.interpolate(coarse, size=(MASTER, MASTER), mode="bicubic", align_corners=False)
    x = F.grid_sample(x, grid + elastic.permute(0, 2, 3, 1), align_corners=False)
    blend = uniform(0.0, recipe.max_blur)[:, None, None, None]
    x = torch.lerp(x, _gaussian(x, 1.5), blend)
    images = mnist_style(x)
    images = images / images.amax((2, 3), keepdim=True).clamp_min(1e-6)  # ink at full intensity, as MNIST's
    noise = uniform(0.0, recipe.max_noise)[:, None, None, None] * torch.rand(n, 1, 1, 1, generator=generator).lt(0.5)
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.clamp_(0, 1)


def sample(bank: GlyphBank, fonts: Sequence[int], count: int, recipe: Recipe, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` augmented images of random digits of `fonts`, and their labels."""
    chosen = torch.tensor(fonts)[torch.randint(len(fonts), (count,), generator=generator)]
    labels = torch.randint(10, (count,), generator=generator)
    return augment(bank.glyphs[chosen, labels], recipe, generator), labels


# ---- the network -----------------------------------------------------------------------


class FontCNN(nn.Module):
    """Five 3 x 3 convolutions with BatchNorm, a 128-d layer and dropout: the network pre-trained on fonts.

    BatchNorm is fine here: the data is public and the network is frozen afterwards, its
    BatchNorm folded into the convolutions (`folded`).
    """

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i, out in enumerate(CHANNELS):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(CHANNELS[-1] * 3 * 3, FEATURES)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURES, 10))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.features(pixels).flatten(1)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(pixels))

    def folded(self) -> dict[str, torch.Tensor]:
        """The feature extractor's tensors with each BatchNorm's eval-mode affine map folded into its convolution."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        norms = [m for m in self.features if isinstance(m, nn.BatchNorm2d)]
        tensors: dict[str, torch.Tensor] = {}
        for i, (conv, norm) in enumerate(zip(convs, norms)):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            tensors[f"conv{i}.weight"] = (conv.weight * scale[:, None, None, None]).detach().clone()
            tensors[f"conv{i}.bias"] = (norm.bias - norm.running_mean * scale).detach().clone()
        tensors["fc.weight"] = self.fc.weight.detach().clone()
        tensors["fc.bias"] = self.fc.bias.detach().clone()
        return tensors


def feature_statistics(tensors: dict[str, torch.Tensor], images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the extractor's features over `images`: called with
    synthetic renders only, which is what makes the standardisation public."""
    with torch.no_grad():
        features = torch.cat([extract(tensors, images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    return features.mean(0), features.std(0)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` in eval mode."""
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
            for i in range(0, len(images), batch_size)
        )
    return correct / max(1, len(images))


# ---- the run ---------------------------------------------------------------------------


def pretrain(
    out_dir: Path,
    recipe: Recipe = Recipe(),
    font_dirs: Sequence[str | Path] = FONT_DIRS,
    max_fonts: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Render, filter, pre-train and write `font-cnn-weights.json` and `font-cnn.json` into `out_dir`; returns the manifest.

    `max_fonts` > 0 takes an evenly spaced subset of the font files (a quick check of the
    pipeline). Seeded throughout: the same fonts and recipe give the same weights on the
    same machine and torch build.
    """
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    paths = find_fonts(font_dirs)
    if max_fonts and len(paths) > max_fonts:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_fonts).round().astype(int)]
    log.info("%d font files under %s", len(paths), ", ".join(map(str, font_dirs)))
    bank = glyph_bank(paths, progress)
    train, held = split_fonts(bank.fonts, recipe.held_out_fraction, recipe.seed)
    log.info(
        "%d fonts kept (%s); %d for training, %d held out",
        len(bank.fonts), ", ".join(f"{len(v)} {k}" for k, v in bank.dropped.items()), len(train), len(held),
    )
    rendered = time.perf_counter()

    held_generator = torch.Generator().manual_seed(recipe.seed + 1)
    held_images, held_labels = _held_out(bank, held or train, recipe, held_generator)
    model = FontCNN(recipe.dropout)
    steps = math.ceil(recipe.images / recipe.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.learning_rate, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    bar = tqdm(range(steps), desc="pre-training on fonts", disable=not progress)
    for step in bar:
        model.train()
        images, labels = sample(bank, train, recipe.batch_size, recipe, generator)
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if not progress and (step + 1) % max(1, steps // 10) == 0:
            log.info("pre-training: step %d of %d, loss %.3f", step + 1, steps, loss.item())
    model.eval()
    held_accuracy = accuracy(model, held_images, held_labels)
    trained = time.perf_counter()
    log.info("pre-trained on %d images in %.0f s: %.2f%% on held-out fonts", steps * recipe.batch_size, trained - rendered, 100 * held_accuracy)

    tensors = model.folded()
    stats_images, _ = sample(bank, list(range(len(bank.fonts))), recipe.statistics_images, recipe, torch.Generator().manual_seed(recipe.seed + 3))
    tensors["feature_mean"], tensors["feature_std"] = feature_statistics(tensors, stats_images)
    manifest = {
        "what": "frozen feature extractor of a CNN pre-trained on digits rendered from fonts; public data only, no MNIST",
        "recipe": dataclasses.asdict(recipe),
        "training-images": steps * recipe.batch_size,
        "statistics": (
            f"feature_mean and feature_std: over {recipe.statistics_images} augmented renders of all kept fonts, "
            f"generator seed {recipe.seed + 3}"
        ),
        "held-out-fonts-accuracy": held_accuracy,
        "held-out-images": len(held_labels),
        "seconds": {"rendering": rendered - start, "training": trained - rendered},
        "torch": torch.__version__,
        "fonts": {
            "training": sorted(bank.fonts[i].path for i in train),
            "held-out": sorted(bank.fonts[i].path for i in held),
            "dropped": {reason: sorted(paths) for reason, paths in bank.dropped.items()},
        },
    }
    write(out_dir, tensors, manifest)
    return manifest


def _held_out(bank: GlyphBank, fonts: Sequence[int], recipe: Recipe, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed augmented test set: each held-out glyph `held_out_images_per_glyph` times."""
    index = torch.tensor(fonts).repeat_interleave(10).repeat(recipe.held_out_images_per_glyph)
    labels = torch.arange(10).repeat(len(fonts)).repeat(recipe.held_out_images_per_glyph)
    return augment(bank.glyphs[index, labels], recipe, generator), labels


def write(out_dir: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """The weights (float32, in `extractor_keys` order) and the manifest, with the weights' digest in it."""
    from common.public_features import MANIFEST_FILE, WEIGHTS_FILE, weights_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE.name
    weights.write_bytes(weights_bytes(tensors))
    manifest = {**manifest, "weights-sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "weights-bytes": weights.stat().st_size}
    (out_dir / MANIFEST_FILE.name).write_text(json.dumps(manifest, indent=1) + "\n")
