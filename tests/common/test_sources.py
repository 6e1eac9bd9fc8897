"""A client's own data from an image folder or an .npz file: real files, MNIST's exact form."""

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import load_mnist, raw_pixels
from common.errors import ConfigError, DataError
from common.config import data_source
from common.config.rules import FOLDER, MNIST, NPZ
from common.sources import load_folder, load_npz

PER_CLASS = 5


@pytest.fixture(scope="module")
def digits(data_dir):
    """PER_CLASS real MNIST test digits of each class, in label order: uint8 (N, 1, 28, 28), labels."""
    images, labels = load_mnist(data_dir, train=False).tensors
    order = torch.cat([torch.nonzero(labels == digit).flatten()[:PER_CLASS] for digit in range(10)])
    return raw_pixels(images[order]), labels[order]


@pytest.fixture
def sources_logs(caplog):
    """dpfl's loggers do not propagate once `enable_logging` ran (see common.logs): listen directly."""
    logger = logging.getLogger("common.sources")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def gray(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("mnist", (MNIST, None)),
        ("folder:data/cats", (FOLDER, Path("data/cats"))),
        ("npz:/x/d.npz", (NPZ, Path("/x/d.npz"))),
    ],
)
def test_sources_parse_without_touching_the_disk(value, expected):
    assert data_source(value, "data-source") == expected


def test_a_source_path_expands_the_home_directory():
    assert data_source("npz:~/d.npz", "k") == (NPZ, Path.home() / "d.npz")


@pytest.mark.parametrize("value", ["", "MNIST", "folder", "folder:", "npz: ", "csv:a.csv", "/data/x.npz", "mnist:x"])
def test_malformed_sources_are_one_line_config_errors(value):
    with pytest.raises(ConfigError) as caught:
        data_source(value, "data-source")
    assert str(caught.value) == f"data-source = {value!r} is invalid: must be mnist, folder:PATH or npz:PATH"


def test_a_folder_of_mnist_digits_round_trips_exactly(digits, tmp_path):
    images, labels = digits
    for i, (image, label) in enumerate(zip(images, labels)):
        save(gray(image[0].numpy()), tmp_path / str(int(label)) / f"{i:03d}.png")
    loaded, loaded_labels, classes = load_folder(tmp_path)
    assert classes == [str(digit) for digit in range(10)]
    assert loaded.dtype == torch.uint8 and loaded_labels.dtype == torch.int64
    assert torch.equal(loaded, images) and torch.equal(loaded_labels, labels)


def test_images_of_any_size_and_mode_load_as_28x28_gray_bytes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), mode="RGB")  # 40 wide, 30 high
    save(rgb, tmp_path / "odd" / "rgb.png")
    save(rgb.convert("RGBA"), tmp_path / "odd" / "rgba.PNG")
    save(rgb.convert("P"), tmp_path / "odd" / "palette.bmp")
    save(rgb.convert("LA"), tmp_path / "odd" / "la.png")
    save(rgb, tmp_path / "odd" / "photo.JPG")
    save(Image.fromarray(rng.integers(0, 65536, (50, 50), dtype=np.uint16)), tmp_path / "odd" / "deep.png")
    images, labels, classes = load_folder(tmp_path)
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.uint8
    assert classes == ["odd"] and labels.tolist() == [0] * 6
    # 16-bit noise is scaled to 0..255, not clipped to white as PIL's own conversion would.
    deep = images[0]  # files are taken in name order: deep.png first
    assert 60 < deep.float().mean() < 200 and deep.min() < 50


def test_equal_channels_give_the_bytes_of_the_gray_image(digits, tmp_path):
    digit = digits[0][7, 0].numpy()
    save(gray(digit), tmp_path / "gray" / "d.png")
    save(Image.fromarray(np.repeat(digit[..., None], 3, axis=2), mode="RGB"), tmp_path / "rgb" / "d.png")
    save(Image.fromarray(digit.astype(np.uint16) * 257), tmp_path / "sixteen" / "d.png")  # k*257 -> k
    images, _, classes = load_folder(tmp_path)
    assert classes == ["gray", "rgb", "sixteen"]
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
    assert torch.equal(images[0, 0], torch.from_numpy(digit))


def test_sorted_class_names_give_the_labels(tmp_path):
    for name, value in [("cat", 200), ("ant", 10), ("cat", 210)]:
        save(gray(np.full((28, 28), value)), tmp_path / name / f"{value}.png")
    images, labels, classes = load_folder(tmp_path)
    assert classes == ["ant", "cat"]
    assert labels.tolist() == [0, 1, 1] and images[:, 0, 0, 0].tolist() == [10, 200, 210]


def test_files_that_are_not_images_are_skipped_and_reported(tmp_path, sources_logs):
    save(gray(np.zeros((28, 28))), tmp_path / "a" / "one.png")
    for name in ["a/notes.txt", "a/.DS_Store", "labels.csv"]:
        (tmp_path / name).write_text("not an image")
    images, _, _ = load_folder(tmp_path)
    assert len(images) == 1
    # One warning (pytest may also see it through the root logger, hence the set).
    (message,) = {r.getMessage() for r in sources_logs.records if r.levelno == logging.WARNING}
    assert "skipped 3 file(s)" in message and str(tmp_path) in message
    assert "labels.csv" in message and "notes.txt" in message


def test_npz_digits_round_trip_exactly(digits, tmp_path):
    images, labels = digits
    np.savez(tmp_path / "d.npz", x=images[:, 0].numpy(), y=labels.numpy().astype(np.uint8))
    loaded, loaded_labels = load_npz(tmp_path / "d.npz")
    assert torch.equal(loaded, images) and torch.equal(loaded_labels, labels)
    assert loaded.dtype == torch.uint8 and loaded_labels.dtype == torch.int64
    np.savez_compressed(tmp_path / "c.npz", x=images.numpy(), y=labels.numpy())  # N x 1 x 28 x 28
    assert torch.equal(load_npz(tmp_path / "c.npz")[0], images)


def test_npz_floats_are_scaled_rounded_and_colour_becomes_luma(digits, tmp_path):
    images = digits[0][:, 0].numpy()
    y = np.arange(len(images))
    np.savez(tmp_path / "unit.npz", x=images / 255.0, y=y)
    np.savez(tmp_path / "bytes.npz", x=images.astype(np.float32), y=y)
    assert torch.equal(load_npz(tmp_path / "unit.npz")[0], digits[0])
    assert torch.equal(load_npz(tmp_path / "bytes.npz")[0], digits[0])

    colour = (100, 150, 200)
    x = np.broadcast_to(np.array(colour, dtype=np.uint8)[None, :, None, None], (3, 3, 32, 32))
    np.savez(tmp_path / "rgb.npz", x=x, y=np.zeros(3, dtype=np.int64))
    loaded, labels = load_npz(tmp_path / "rgb.npz")
    assert loaded.shape == (3, 1, 28, 28) and loaded.dtype == torch.uint8 and labels.tolist() == [0, 0, 0]
    as_pil = np.asarray(Image.new("RGB", (32, 32), colour).convert("L"))[0, 0]  # 141
    assert (loaded == int(as_pil)).all()


def test_npz_of_another_size_is_resized_smoothly(tmp_path):
    x = np.zeros((2, 56, 56), dtype=np.uint8)
    x[:, :, 28:] = 255  # left half dark, right half light
    np.savez(tmp_path / "big.npz", x=x, y=np.array([3, 4]))
    images, labels = load_npz(tmp_path / "big.npz")
    assert images.shape == (2, 1, 28, 28) and labels.tolist() == [3, 4]
    assert (images[:, :, :, :13] == 0).all() and (images[:, :, :, 15:] == 255).all()


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


X = np.zeros((4, 28, 28), dtype=np.uint8)
Y = np.arange(4)


def _folder_with(tmp_path: Path, files: dict[str, bytes | Image.Image]) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            content.save(root / name)
    return root


BLACK = Image.new("L", (28, 28))
BAD_INPUTS = {
    # case: (make the input under tmp_path -> (loader, path, name to be named), expected fragment)
    "folder missing": (lambda t: (load_folder, t / "nope", "nope"), "not found; point the source at a folder with one"),
    "folder is a file": (lambda t: (load_folder, _npz(t / "d.npz", x=X, y=Y), "d.npz"), "is not a directory"),
    "no class folders": (lambda t: (load_folder, _folder_with(t, {"a.png": BLACK}), "imgs"), "no class sub-directories"),
    "empty class folder": (
        lambda t: (load_folder, _folder_with(t, {"a/1.png": BLACK, "b/notes.txt": b"x"}), "imgs/b"),
        "has no .png/.jpg/.jpeg/.bmp images; add images or remove the folder",
    ),
    "undecodable image": (
        lambda t: (load_folder, _folder_with(t, {"a/1.png": BLACK, "a/2.png": b"not a png"}), "a/2.png"),
        "is not an image PIL can decode",
    ),
    "truncated image": (
        lambda t: (load_folder, _folder_with(t, {"a/1.jpg": _jpeg_bytes()[:200]}), "a/1.jpg"),
        "remove or replace it",
    ),
    "no images at all": (
        lambda t: (load_folder, _folder_with(t, {"a/x.txt": b"x", "b/y.gif": b"y"}), "imgs"),
        "has no .png/.jpg/.jpeg/.bmp images in class folders",
    ),
    "npz missing": (lambda t: (load_npz, t / "none.npz", "none.npz"), "not found"),
    "npz is text": (lambda t: (load_npz, _text(t / "d.npz"), "d.npz"), "not a zip archive of arrays"),
    "npz is a pickle": (lambda t: (load_npz, _pickled(t / "d.npz"), "d.npz"), "not a zip archive of arrays"),
    "npz holds objects": (
        lambda t: (load_npz, _npz(t / "d.npz", x=np.array([X, None], dtype=object), y=Y), "d.npz"),
        "is not a valid .npz file",
    ),
    "npy, not npz": (lambda t: (load_npz, _npy(t / "d.npz"), "d.npz"), "(an .npy file, one array, not x and y)"),
    "npz truncated": (lambda t: (load_npz, _truncated(t / "d.npz"), "d.npz"), "is not a valid .npz file"),
    "npz member corrupt": (lambda t: (load_npz, _corrupt_member(t / "d.npz"), "d.npz"), "is not a valid .npz file"),
    "no y": (lambda t: (load_npz, _npz(t / "d.npz", x=X, labels=Y), "d.npz"), "has no array y (it has labels, x)"),
    "no x or y": (lambda t: (load_npz, _npz(t / "d.npz", a=X), "d.npz"), "has no array x or y (it has a)"),
    "x 2-D": (lambda t: (load_npz, _npz(t / "d.npz", x=X[0], y=Y), "x has shape (28, 28)"), "NxHxW or NxCxHxW"),
    "x channels last": (
        lambda t: (load_npz, _npz(t / "d.npz", x=np.zeros((4, 28, 28, 3)), y=Y), "x has shape (4, 28, 28, 3)"),
        "x.transpose(0, 3, 1, 2)",
    ),
    "x text": (lambda t: (load_npz, _npz(t / "d.npz", x=np.full((4, 2, 2), "a"), y=Y), "x has dtype <U1"), "save uint8"),
    "x and y lengths": (lambda t: (load_npz, _npz(t / "d.npz", x=X, y=Y[:3]), "d.npz"), "x has 4 images but y has 3"),
    "y float": (lambda t: (load_npz, _npz(t / "d.npz", x=X, y=Y / 2), "y has shape (4,) and dtype float64"), "1-D integer"),
    "y 2-D": (lambda t: (load_npz, _npz(t / "d.npz", x=X, y=Y[:, None]), "y has shape (4, 1)"), "1-D integer"),
    "y negative": (lambda t: (load_npz, _npz(t / "d.npz", x=X, y=Y - 1), "d.npz"), "negative labels (smallest -1)"),
    "empty": (lambda t: (load_npz, _npz(t / "d.npz", x=X[:0], y=Y[:0]), "x has shape (0, 1, 28, 28)"), "no pixels"),
    "x above 255": (
        lambda t: (load_npz, _npz(t / "d.npz", x=np.full((4, 28, 28), 300.0), y=Y), "d.npz"),
        "outside [0, 255]; scale to 0..1 or 0..255",
    ),
    "x negative int": (lambda t: (load_npz, _npz(t / "d.npz", x=X.astype(np.int16) - 1, y=Y), "d.npz"), "[-1, -1]"),
    "x NaN": (
        lambda t: (load_npz, _npz(t / "d.npz", x=np.where(X == 0, np.nan, 0.0), y=Y), "d.npz"),
        "x holds NaN or infinite values",
    ),
}


def _text(path: Path) -> Path:
    path.write_text("x,y\n0,1\n")
    return path


def _pickled(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"x": X, "y": Y}))
    return path


def _npy(path: Path) -> Path:
    with path.open("wb") as f:
        np.save(f, X)
    return path


def _truncated(path: Path) -> Path:
    data = _npz(path, x=X, y=Y).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupt_member(path: Path) -> Path:
    """A whole zip whose compressed x no longer inflates."""
    np.savez_compressed(path, x=np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8), y=Y)
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)
    path.write_bytes(bytes(data))
    return path


def _jpeg_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_naming_the_file_and_the_fix(case, tmp_path):
    make, fragment = BAD_INPUTS[case]
    loader, path, name = make(tmp_path)
    with pytest.raises(DataError) as caught:
        loader(path)
    message = str(caught.value)
    print(f"{case}: {message}")
    assert "\n" not in message and fragment in message and name in message
    assert str(path) in message
