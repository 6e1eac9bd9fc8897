"""A client's own data set from an image folder or an .npz file, as MNIST-shaped tensors.

Users bring their own data; the rest of dpfl knows only MNIST's form: (N, 1, 28, 28) uint8
grayscale images (normalised later with MNIST's mean/std) and int64 labels. Every loader
here ends in that form, so nothing downstream needs to know where the data came from.
Anything the user can fix is a one-line `DataError` naming the file and what to do.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from common.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SIZE = 28  # MNIST's side length: the models' input
#: PIL's RGB -> 'L' in integers: (19595 R + 38470 G + 7471 B + 32768) >> 16 (ITU-R 601 luma).
LUMA = (19595, 38470, 7471)
NPZ_FIX = "save it with numpy.savez(path, x=images, y=labels)"


def _error(message: str) -> DataError:
    """A DataError on one line even when a path or a library's reason holds a line break."""
    return DataError(message.replace("\r", "\\r").replace("\n", "\\n"))


def load_folder(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images under PATH/<class-name>/ as MNIST-shaped tensors, with the sorted class names.

    Discovery is torchvision's (`find_classes`, `make_dataset`), so labels match what
    ImageFolder would give: class names sorted, suffixes matched case-insensitively. Files
    without an image suffix are skipped, but reported in one warning: a silently dropped
    file would be a silently smaller data set. Each image is decoded with PIL, made 8-bit
    grayscale (alpha dropped; 16-bit scaled, since PIL's own conversion clips it to 255)
    and resized to 28x28 with LANCZOS when it is another size (aspect ratio not kept).
    """
    from torchvision.datasets.folder import find_classes, make_dataset  # late: slow import

    if not path.is_dir():
        state = "is not a directory" if path.exists() else "not found"
        raise _error(f"image folder {path} {state}; point the source at a folder with one sub-directory per class")
    skipped: list[str] = []  # files outside class folders, then files without an image suffix

    def is_image(file: str) -> bool:
        if file.lower().endswith(IMAGE_SUFFIXES):
            return True
        skipped.append(os.path.relpath(file, path))
        return False

    try:
        skipped += [entry.name for entry in os.scandir(path) if not entry.is_dir()]
        classes, class_to_idx = find_classes(path)
        samples = make_dataset(path, class_to_idx, is_valid_file=is_image, allow_empty=True)
    except FileNotFoundError:
        raise _error(
            f"image folder {path} has no class sub-directories; put each class's images into {path}/<class-name>/"
        ) from None
    except OSError as exc:
        raise _error(f"image folder {path} cannot be read ({exc}); check its permissions") from None
    if skipped:
        log.warning(
            "%s: skipped %d file(s) that are not images inside a class folder (suffix not one of %s), e.g. %s",
            path, len(skipped), ", ".join(IMAGE_SUFFIXES), ", ".join(sorted(skipped)[:3]),
        )
    suffixes = "/".join(IMAGE_SUFFIXES)
    if not samples:
        raise _error(f"image folder {path} has no {suffixes} images in class folders; add them to {path}/<class-name>/")
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise _error(f"class folder {path / empty[0]} has no {suffixes} images; add images or remove the folder")
    images = np.stack([_decode(Path(file)) for file, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    log.info("%s: %d images in %d classes", path, len(samples), len(classes))
    return torch.from_numpy(images).unsqueeze(1), labels, classes


def _decode(file: Path) -> np.ndarray:
    """One image file as 28x28 uint8 grayscale pixels."""
    try:
        with Image.open(file) as image:
            image.load()
            gray = _grayscale(ImageOps.exif_transpose(image))
    except Exception as exc:  # PIL's decoders raise many types on corrupt or hostile files
        reason = f"{type(exc).__name__}: {exc}"
        raise _error(f"{file} is not an image PIL can decode ({reason}); remove or replace it") from None
    if gray.size != (SIZE, SIZE):
        gray = gray.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


def _grayscale(image: Image.Image) -> Image.Image:
    """8-bit 'L': 16/32-bit integer modes are scaled from 0..65535 (PIL would clip them)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.rint(wide).astype(np.uint8))
    return image.convert("L")


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays `x` (images) and `y` (labels) of an .npz file as MNIST-shaped tensors.

    x is N×H×W or N×C×H×W with C 1 or 3, uint8 (or any integer type within 0..255) or
    float: floats within [0, 1] are scaled by 255, floats within [0, 255] taken as they
    are, then rounded. Three channels become gray with PIL's own integer luma formula, so an
    .npz and an image folder of the same 28x28 pictures give the same bytes, hence the same
    records. Other sizes are resized with torch's bilinear interpolation with antialiasing
    (aspect ratio not kept), which can differ from PIL's resizing of the same file by a grey
    level: the same picture resized two ways is two records.
    Loaded with allow_pickle=False: a data file must not run code.
    """
    if not path.is_file():
        raise _error(f"npz file {path} not found (or not a file); {NPZ_FIX}")
    try:
        with path.open("rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        archive = zipfile.is_zipfile(path)
    except OSError as exc:
        raise _error(f"npz file {path} cannot be read ({exc}); check its permissions") from None
    if npy or not archive:  # numpy itself would call any non-zip file "pickled data"
        what = "an .npy file, one array, not x and y" if npy else "not a zip archive of arrays"
        raise _error(f"{path} is not a valid .npz file ({what}); {NPZ_FIX}")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = data.files
            x, y = (data[key] if key in files else None for key in ("x", "y"))
    except Exception as exc:  # corrupt members, bad headers, object arrays: not a usable npz
        reason = f"{type(exc).__name__}: {exc}"
        raise _error(f"{path} is not a valid .npz file ({reason}); {NPZ_FIX}") from None
    if x is None or y is None:
        missing = " or ".join(key for key, array in (("x", x), ("y", y)) if array is None)
        has = ", ".join(sorted(files)) or "no arrays"
        raise _error(f"npz file {path} has no array {missing} (it has {has}); {NPZ_FIX}")
    return _images(x, path), _labels(y, len(x), path)


def _images(x: np.ndarray, path: Path) -> torch.Tensor:
    """Check x and bring it to (N, 1, 28, 28) uint8."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise _error(
            f"npz file {path}: x has shape {x.shape}; it must be NxHxW or NxCxHxW with C 1 or 3 "
            "(for channels-last NxHxWxC save x.transpose(0, 3, 1, 2))"
        )
    if x.size == 0:
        raise _error(f"npz file {path}: x has shape {x.shape}, no pixels; save at least one image")
    if x.dtype.kind not in "uif":
        raise _error(f"npz file {path}: x has dtype {x.dtype}; save uint8 (0..255) or float (0..1 or 0..255) pixels")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise _error(f"npz file {path}: x holds NaN or infinite values; replace them with pixel values")
    low, high = x.min(), x.max()
    if low < 0 or high > 255:
        raise _error(f"npz file {path}: x values lie in [{low}, {high}], outside [0, 255]; scale to 0..1 or 0..255")
    if x.dtype == np.uint8 and x.shape[1:] == (1, SIZE, SIZE):
        return torch.from_numpy(np.ascontiguousarray(x))
    pixels = torch.from_numpy(x.astype(np.float32))
    if x.dtype.kind == "f" and high <= 1:
        pixels *= 255
    if pixels.shape[1] == 3:  # as PIL does it, on 8-bit values: the same picture, the same grey
        rgb = pixels.round().clamp(0, 255).to(torch.int64)
        pixels = ((sum(w * rgb[:, c : c + 1] for c, w in enumerate(LUMA)) + 32768) >> 16).to(torch.float32)
    if pixels.shape[2:] != (SIZE, SIZE):
        pixels = torch.nn.functional.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def _labels(y: np.ndarray, count: int, path: Path) -> torch.Tensor:
    """Check y against x and return it as int64."""
    if y.ndim != 1 or y.dtype.kind not in "ui":
        raise _error(f"npz file {path}: y has shape {y.shape} and dtype {y.dtype}; save y as 1-D integer labels")
    if len(y) != count:
        raise _error(f"npz file {path}: x has {count} images but y has {len(y)} labels; save one label per image")
    if y.min() < 0:
        raise _error(f"npz file {path}: y holds negative labels (smallest {y.min()}); use class indices 0, 1, 2, ...")
    return torch.from_numpy(y.astype(np.int64))
