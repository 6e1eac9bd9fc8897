"""The trained model's way to production: self-contained files, their cost, and predictions.

A run ends with `model.pt`, a `state_dict` that is useless without this project's model
code. Exporting turns it into files that need none of it: TorchScript (`torch.jit.load` in
Python, `torch::jit::load` in C++) and ONNX (onnxruntime and most serving stacks). The
report gives what a deployment decision turns on: parameter count, file sizes and
single-image CPU latency.

`torch.jit` is deprecated as of torch 2.14 (it still works and loads everywhere libtorch
runs); its FutureWarnings are silenced here because the user asked for exactly this format.
ONNX needs the optional `onnx` and `onnxscript` packages (`pip install dpfl[export]`);
without them the export writes TorchScript only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import statistics
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.config import RunConfig, load_toml
from common.data import MEAN, STD
from common.errors import DpflError
from common.model import build_model, split
from common.storage import CONFIG_FILE, MODEL_FILE

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
IMAGE_SIZE = 28
LEGACY_MODEL = "cnn"
LATENCY_RUNS = 200
WARMUP_RUNS = 20

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and what the model costs to serve."""

    out_dir: Path
    parameters: int
    #: file name -> size in bytes, the source checkpoint first for comparison
    file_bytes: dict[str, int]
    #: runtime -> median single-image latency in ms on one CPU thread
    latency_ms: dict[str, float]


@dataclass(frozen=True)
class Prediction:
    """The most likely digit of one image and its softmax probability."""

    digit: int
    probability: float


def model_path(source: Path) -> Path:
    """The model file behind a run directory or a model file path."""
    path = source / MODEL_FILE if source.is_dir() else source
    if not path.is_file():
        raise DpflError(f"{path} not found; pass a run directory (outputs/<run>/) or a model file")
    return path


def is_torchscript(path: Path) -> bool:
    """Whether a file is a TorchScript archive: a zip with constants.pkl, unlike `torch.save`'s."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def load_model(source: Path) -> nn.Module:
    """A run's model in eval mode, built from the architecture its `config.toml` names."""
    path = model_path(source)
    if is_torchscript(path):
        raise DpflError(
            f"{path} is already a TorchScript export; export from the run's {MODEL_FILE}"
        )
    name = _architecture(path.parent / CONFIG_FILE)
    model = build_model(name)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # unpickling or key/shape mismatch: either way not our checkpoint
        raise DpflError(
            f"{path} is not a dpfl '{name}' model ({type(err).__name__}); pass a run directory, "
            f"its {MODEL_FILE} or a {TORCHSCRIPT_FILE} from `dpfl export`"
        ) from None
    return model.eval()


def _architecture(config_file: Path) -> str:
    """The `model` of a run's config.toml; runs saved before the key existed all trained the CNN."""
    if not config_file.is_file():
        return LEGACY_MODEL
    values = load_toml(config_file)
    values.setdefault("model", LEGACY_MODEL)
    return RunConfig.from_mapping(values).training.model


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch 2.14's deprecation warnings for torch.jit, which we use deliberately."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """An exported model, loaded without any of this project's code."""
    try:
        with _quiet_jit():
            return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise DpflError(
            f"{path} is not a loadable TorchScript model ({str(err).splitlines()[0]}); "
            "export it again with `dpfl export`"
        ) from None


def load_predictor(source: Path) -> Predictor:
    """A model for prediction: from a run directory, its `model.pt` or a TorchScript export."""
    path = model_path(source)
    return load_torchscript(path) if is_torchscript(path) else load_model(path)


def export_model(
    source: Path, out_dir: Path | None = None, runs: int = LATENCY_RUNS
) -> ExportReport:
    """Write TorchScript (and ONNX where available) beside the model or into `out_dir`; measure."""
    path = model_path(source)
    model = load_model(path)
    if split(model)[1] is not None:
        raise DpflError(
            f"{path} is a {type(model).__name__} model, whose fixed front-end (kymatio's scattering, "
            "a custom autograd function) neither TorchScript nor ONNX can capture; serve model.pt "
            "with `dpfl predict` instead"
        )
    out = (out_dir or path.parent).resolve()
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with _quiet_jit():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(out / TORCHSCRIPT_FILE))
    files = [path, out / TORCHSCRIPT_FILE]
    runtimes: dict[str, Callable[[], object]] = {
        "pytorch": lambda: model(example),
        "torchscript": lambda: traced(example),
    }
    if _installed("onnx", "onnxscript"):
        _export_onnx(model, example, out / ONNX_FILE)
        files.append(out / ONNX_FILE)
        if _installed("onnxruntime"):
            runtimes["onnxruntime"] = _onnxruntime_call(out / ONNX_FILE, example)
    else:
        log.info("ONNX skipped: install `onnx` and `onnxscript` (pip install dpfl[export])")
    return ExportReport(
        out_dir=out,
        parameters=sum(p.numel() for p in model.parameters()),
        file_bytes={file.name: file.stat().st_size for file in files},
        latency_ms={name: median_latency_ms(call, runs) for name, call in runtimes.items()},
    )


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in packages)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """One self-contained ONNX file (weights inlined) with a dynamic batch axis."""
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )


def _onnxruntime_call(path: Path, example: torch.Tensor) -> Callable[[], object]:
    """One single-threaded onnxruntime inference, comparable with torch at one thread."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": example.numpy()}
    return lambda: session.run(None, feed)


def median_latency_ms(call: Callable[[], object], runs: int = LATENCY_RUNS) -> float:
    """Median wall time of `call` after a warm-up, on one CPU thread: the cost of one request."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(WARMUP_RUNS):
                call()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def load_image(path: Path) -> torch.Tensor:
    """A digit image as a (1, 28, 28) input normalised like MNIST: a light digit on dark.

    Photos and drawings are usually dark on light, so the image is inverted when its border
    (background) is light. Other sizes are resized to 28x28 (without keeping the aspect ratio).
    """
    if not path.is_file():
        raise DpflError(f"image {path} not found; pass PNG or JPEG files of single digits")
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except OSError:  # includes PIL's UnidentifiedImageError and truncated files
        raise DpflError(f"{path} is not an image PIL can read; pass PNG or JPEG files") from None
    if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
        gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.array(gray, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    if border.mean() > 127.5:
        pixels = 255 - pixels
    return torch.from_numpy(pixels).unsqueeze(0).float().div_(255.0).sub_(MEAN).div_(STD)


def predict(model: Predictor, images: Sequence[Path]) -> list[Prediction]:
    """The most likely digit of each image, in one batch."""
    batch = torch.stack([load_image(path) for path in images])
    with torch.inference_mode():
        probabilities = torch.softmax(model(batch), dim=1)
    best, digits = probabilities.max(dim=1)
    return [Prediction(int(d), float(p)) for d, p in zip(digits, best, strict=True)]
