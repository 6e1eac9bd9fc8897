"""The trained model's way to production: self-contained files, their cost, and predictions.

A run ends with `model.pt`, a `state_dict` that is useless without this project's model
code. Exporting turns it into files that need none of it: TorchScript (`torch.jit.load` in
Python, `torch::jit::load` in C++) and ONNX (onnxruntime and most serving stacks), the
whole model, fixed front-ends included, with a `model-card.md` that says what it was trained
on, at what privacy cost, how well it does and how to load it. The report gives what a
deployment decision turns on: parameter count, file sizes and single-image CPU latency; on
request, an int8 ONNX variant, kept only if its test accuracy stays within a tenth of a point.

`torch.jit` is deprecated as of torch 2.14 (it still works and loads everywhere libtorch
runs); its FutureWarnings are silenced here because the user asked for exactly this format.
ONNX needs the optional `onnx` and `onnxscript` packages (`pip install dpfl[export]`);
without them the export writes TorchScript only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
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
from common.config.rules import NO_EVALUATION
from common.data import MEAN, STD, load_dataset, resolve_data_dir
from common.errors import DpflError
from common.model import build_model
from common.storage import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE

log = logging.getLogger(__name__)

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
MODEL_CARD_FILE = "model-card.md"
#: The int8 variant is kept only if its test accuracy is at most this far below the float model's.
INT8_ACCURACY_TOLERANCE = 0.001
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
    #: runtime -> accuracy on the test set (only when the int8 variant was tried)
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    #: what a reader of the report must know (an int8 variant dropped, ONNX skipped)
    notes: list[str] = dataclasses.field(default_factory=list)


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
    training = _run_config(path.parent).training
    name = training.model
    model = build_model(name, num_classes=training.num_classes)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # unpickling or key/shape mismatch: either way not our checkpoint
        raise DpflError(
            f"{path} is not a dpfl '{name}' model ({type(err).__name__}); pass a run directory, "
            f"its {MODEL_FILE} or a {TORCHSCRIPT_FILE} from `dpfl export`"
        ) from None
    return model.eval()


def _run_config(run_dir: Path) -> RunConfig:
    """The config of the run a model came from; runs saved before `model` existed (and a bare
    model file's) trained the CNN."""
    config_file = run_dir / CONFIG_FILE
    values = load_toml(config_file) if config_file.is_file() else {}
    values.setdefault("model", LEGACY_MODEL)
    return RunConfig.from_mapping(values)


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
    """A model for prediction: a TorchScript export when there is a current one, else `model.pt`.

    The export needs none of this project's model code (nor kymatio, nor Opacus); one older
    than the `model.pt` beside it (a resumed run trained on) is not used.
    """
    path = model_path(source)
    if is_torchscript(path):
        return load_torchscript(path)
    exported = path.parent / TORCHSCRIPT_FILE
    if exported.is_file() and exported.stat().st_mtime >= path.stat().st_mtime:
        return load_torchscript(exported)
    return load_model(path)


def export_model(
    source: Path, out_dir: Path | None = None, runs: int = LATENCY_RUNS, int8: bool = False
) -> ExportReport:
    """Write TorchScript, ONNX (where installed) and a model card beside the model or into `out_dir`; measure.

    With `int8`, also an int8 ONNX variant (onnxruntime's dynamic quantisation), kept only if
    its accuracy on the test set is within `INT8_ACCURACY_TOLERANCE` of the float model's.
    """
    path = model_path(source)
    model = load_model(path)
    config = _run_config(path.parent)
    out = (out_dir or path.parent).resolve()
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    traced = _trace(model, example, out / TORCHSCRIPT_FILE)
    files = [path, out / TORCHSCRIPT_FILE]
    runtimes: dict[str, Callable[[], object]] = {
        "pytorch": lambda: model(example),
        "torchscript": lambda: traced(example),
    }
    accuracy: dict[str, float] = {}
    notes = []
    if _installed("onnx", "onnxscript"):
        _export_onnx(model, example, out / ONNX_FILE)
        files.append(out / ONNX_FILE)
        if _installed("onnxruntime"):
            runtimes["onnxruntime"] = _onnxruntime_call(out / ONNX_FILE, example)
            if int8 and config.evaluation.eval_dataset == NO_EVALUATION:
                notes.append("int8 skipped: the run has no evaluation set (eval-dataset = none) to check its accuracy on")
            elif int8:
                kept, accuracy, note = _int8_variant(out / ONNX_FILE, out / INT8_ONNX_FILE, config)
                notes.append(note)
                if kept:
                    files.append(out / INT8_ONNX_FILE)
                    runtimes["onnxruntime int8"] = _onnxruntime_call(out / INT8_ONNX_FILE, example)
    else:
        notes.append("ONNX skipped: install `onnx` and `onnxscript` (pip install dpfl[export])")
    if int8 and "onnxruntime" not in runtimes:
        notes.append("int8 skipped: it needs onnx, onnxscript and onnxruntime (pip install dpfl[export])")
    parameters = sum(p.numel() for p in model.parameters())
    known = config if (path.parent / CONFIG_FILE).is_file() else None
    write_model_card(out / MODEL_CARD_FILE, path.parent, known, type(model).__name__, parameters, [f.name for f in files[1:]])
    return ExportReport(
        out_dir=out,
        parameters=parameters,
        file_bytes={file.name: file.stat().st_size for file in files},
        latency_ms={name: median_latency_ms(call, runs) for name, call in runtimes.items()},
        accuracy=accuracy,
        notes=notes,
    )


def _trace(model: nn.Module, example: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    """The model traced to TorchScript and saved; a layer tracing cannot follow is a one-line error."""
    try:
        with _quiet_jit():
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path))
    except Exception as err:  # tracing fails in many ways, all of them the model's
        raise DpflError(
            f"{type(model).__name__} cannot be exported to TorchScript ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); its layers must be plain "
            "tensor operations that torch.jit.trace can follow"
        ) from None
    return traced


def _int8_variant(onnx_file: Path, int8_file: Path, config: RunConfig) -> tuple[bool, dict[str, float], str]:
    """Quantise the linear layers' weights to int8 and keep the file only if accuracy holds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only matrix products: the scattering convolutions are fixed filters whose precision
    # the features need, and the weights are the head's. The quantiser's advice to run its
    # shape pre-processing goes to the root logger; it concerns static quantisation.
    with _without_root_warnings():
        quantize_dynamic(str(onnx_file), str(int8_file), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    images, labels = _test_set(config)
    accuracy = {
        "onnxruntime": _onnx_accuracy(onnx_file, images, labels),
        "onnxruntime int8": _onnx_accuracy(int8_file, images, labels),
    }
    loss = accuracy["onnxruntime"] - accuracy["onnxruntime int8"]
    if loss > INT8_ACCURACY_TOLERANCE:
        int8_file.unlink()
        return False, accuracy, f"int8 dropped: it loses {100 * loss:.2f} points of test accuracy (at most {100 * INT8_ACCURACY_TOLERANCE:.1f} allowed)"
    return True, accuracy, f"int8 kept: {100 * loss:.2f} points of test accuracy lost (at most {100 * INT8_ACCURACY_TOLERANCE:.1f} allowed)"


@contextlib.contextmanager
def _without_root_warnings() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _test_set(config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """The run's evaluation set (`eval-dataset`) as the model takes it."""
    test = load_dataset(config.evaluation.eval_dataset, resolve_data_dir(config.data.data_dir))
    return test.tensors[0].numpy(), test.tensors[1].numpy()


def _onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    predicted = np.concatenate(
        [session.run(None, {"image": images[i : i + batch]})[0].argmax(axis=1) for i in range(0, len(images), batch)]
    )
    return float((predicted == labels).mean())


def _what_left(config: RunConfig, summary: dict | None) -> str:
    """What the clients released, by the run's DP mode: the claim the card may make."""
    if summary is not None and summary.get("epsilon") is None:
        return "the model updates were released without differential privacy (target-epsilon = inf)."
    if config.privacy.dp_mode == "central":
        return "clients sent clipped model updates to the server, which noised their sum (central DP: the server is trusted)."
    return "clients released only model updates noised by DP-SGD."


def write_model_card(
    path: Path, run_dir: Path, config: RunConfig | None, architecture: str, parameters: int, files: list[str]
) -> None:
    """`model-card.md`: data, privacy guarantee and unit, accuracy, input format, how to load it.

    `config` is the run's (None when its config.toml was not beside the model)."""
    summary_file = run_dir / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if config is None:
        data = "unknown: the run's config.toml was not beside the model"
    else:
        # The path of a user's data set stays out of a file meant to be published.
        dataset = f"{config.total_train_examples():,} MNIST training images" if config.data.dataset == "mnist" else "a data set of the user's"
        data = (
            f"{dataset}, cut into {config.federation.num_clients} client shards ({config.data.partitioner}) in a "
            "simulation; in a deployment, whatever each client's node config names, which the server "
            f"never sees. No image left its client: {_what_left(config, summary)}"
        )
    if summary is None:
        privacy = accuracy = "unknown: the run has no summary.json (unfinished?)"
    else:
        unit = summary.get("privacy-unit", "example")
        if summary.get("epsilon") is None:
            privacy = "**none**: trained without differential privacy (target-epsilon = inf)"
        else:
            privacy = (
                f"(ε = {summary['epsilon']:.3f}, δ = {summary['delta']:g})-differential privacy per "
                f"{unit} ({summary.get('dp-mode', 'local')} DP{', accountant ' + config.privacy.accountant if config else ''}: "
                "an upper bound, cumulative over every release of the data)"
            )
        test = summary.get("test-accuracy")
        accuracy = (
            f"{100 * test:.2f} % on {summary.get('evaluation', 'mnist-test')} after {summary['rounds-completed']} rounds"
            if test is not None else "not evaluated (eval-dataset = none)"
        )
    path.write_text(
        f"""# Model card: {run_dir.name}

- **Model**: {architecture}, {parameters:,} trained parameters; files: {', '.join(files)}
- **Data**: {data}
- **Privacy**: {privacy}
- **Accuracy**: {accuracy}
- **Input**: float32 (N, 1, 28, 28): a light digit on a dark background, pixels scaled to
  [0, 1], then normalised with MNIST's mean {MEAN} and standard deviation {STD}
- **Output**: (N, {config.training.num_classes if config else 10}) scores (logits); the class is their argmax

## Load it

```python
import torch
model = torch.jit.load("{TORCHSCRIPT_FILE}").eval()
digits = model(images).argmax(dim=1)
```

```python
import onnxruntime
session = onnxruntime.InferenceSession("{ONNX_FILE}")
digits = session.run(None, {{"image": images}})[0].argmax(axis=1)  # images: a NumPy array
```
""",
        encoding="utf-8",
    )


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in packages)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """One self-contained ONNX file (weights inlined) with a dynamic batch axis.

    Exported from a batch of two: torch.export specialises an axis of size 1 to a constant.
    """
    torch.onnx.export(
        model,
        (example.expand(2, *example.shape[1:]),),
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
