"""`dpfl export` and `dpfl predict`: exports agree with the PyTorch model; digits are read right."""

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import tomli_w
from torchvision.datasets import MNIST

from common.config import RunConfig
from common.data import load_mnist
from common.errors import DpflError
from common.export import (
    INT8_ACCURACY_TOLERANCE,
    INT8_ONNX_FILE,
    MODEL_CARD_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    export_model,
    load_image,
    load_model,
    load_predictor,
    load_torchscript,
)
from common.model import ScatterNet, build_model
from common.storage import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from simulations.cli import export, predict

TRAIN_IMAGES, STEPS, BATCH = 4000, 300, 64  # ~96% test accuracy in about two seconds
PREDICTION = re.compile(r"^(?P<path>.+): digit (?P<digit>\d) \(p=(?P<p>[01]\.\d{3})\)$")


def run_cli(*argv: object) -> int:
    parser = argparse.ArgumentParser(prog="dpfl")
    commands = parser.add_subparsers(dest="command", required=True)
    export.register(commands)
    predict.register(commands)
    args = parser.parse_args([str(arg) for arg in argv])
    return args.handler(args)


def batched_logits(model, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    with torch.inference_mode():
        starts = range(0, len(images), batch_size)
        return torch.cat([model(images[i : i + batch_size]) for i in starts])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A run-directory-like folder holding a briefly SGD-trained CNN, and the model itself."""
    images, labels = (t[:TRAIN_IMAGES] for t in load_mnist(data_dir, train=True).tensors)
    model = build_model("cnn", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        index = torch.randint(0, TRAIN_IMAGES, (BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run_dir = tmp_path_factory.mktemp("run")
    torch.save(model.state_dict(), run_dir / MODEL_FILE)
    (run_dir / CONFIG_FILE).write_text('model = "cnn"\n')
    return run_dir, model.eval()


@pytest.fixture(scope="module")
def export_output(trained) -> str:
    """`dpfl export RUN_DIR`'s printed report; the exports land in the run directory."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert run_cli("export", trained[0]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def test_set(data_dir):
    return load_mnist(data_dir, train=False).tensors


def test_export_reports_parameters_and_file_sizes(trained, export_output):
    run_dir, model = trained
    parameters = sum(p.numel() for p in model.parameters())
    assert re.search(rf"parameters\s+{parameters:,}\n", export_output)
    for name in (MODEL_FILE, TORCHSCRIPT_FILE):
        size = (run_dir / name).stat().st_size
        assert re.search(rf"{re.escape(name)}\s+{size:,} bytes", export_output)
    for runtime in ("pytorch", "torchscript"):
        ms = float(re.search(rf"latency {runtime}\s+([\d.]+) ms", export_output).group(1))
        assert 0 < ms < 1000


def test_torchscript_matches_pytorch_on_test_set(trained, export_output, test_set):
    run_dir, model = trained
    images, labels = test_set
    expected = batched_logits(model, images)
    actual = batched_logits(load_torchscript(run_dir / TORCHSCRIPT_FILE), images)
    assert (expected.argmax(1) == labels).float().mean() > 0.9  # the comparison means something
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_onnx_matches_pytorch_on_test_set(trained, export_output, test_set):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    run_dir, model = trained
    images, _ = test_set
    session = onnxruntime.InferenceSession(
        str(run_dir / ONNX_FILE), providers=["CPUExecutionProvider"]
    )

    def onnx_model(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": batch.numpy()})[0])

    expected = batched_logits(model, images)
    actual = batched_logits(onnx_model, images, batch_size=3000)  # last batch of 1000: dynamic axis
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert f"{ONNX_FILE} " in export_output and "latency onnxruntime" in export_output


def test_torchscript_loads_without_dpfl_code(trained, export_output):
    script = (
        "import sys, torch\n"
        "for package in ('common', 'server', 'client', 'simulations'):\n"
        "    sys.modules[package] = None  # any import of dpfl code now fails\n"
        "model = torch.jit.load(sys.argv[1])\n"
        "print(tuple(model(torch.zeros(3, 1, 28, 28)).shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, str(trained[0] / TORCHSCRIPT_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 10)"


@pytest.fixture
def digit_images(trained, data_dir, test_set, tmp_path):
    """Real test digits the model gets right with confidence, saved as a user might have them."""
    images, labels = test_set
    probabilities = torch.softmax(batched_logits(trained[1], images[:500]), dim=1)
    right = probabilities.argmax(1) == labels[:500]
    confident = (right & (probabilities.max(1).values > 0.99)).nonzero()
    picks = [int(i) for i in confident[:4, 0]]
    raw = MNIST(str(data_dir), train=False).data.numpy()
    variants = {
        "plain.png": lambda x: Image.fromarray(x),
        "inverted.png": lambda x: Image.fromarray(255 - x),  # black on white, like ink on paper
        "large.png": lambda x: Image.fromarray(x).resize((56, 56), Image.Resampling.LANCZOS),
        "photo.jpg": lambda x: Image.fromarray(255 - x).resize((56, 56), Image.Resampling.LANCZOS),
    }
    cases = []
    for index, (name, make) in zip(picks, variants.items(), strict=True):
        path = tmp_path / f"{index}-{name}"
        make(raw[index]).save(path)
        cases.append((path, int(labels[index]), index))
    return cases


def test_load_image_reproduces_training_normalisation(digit_images, test_set):
    for path, _, index in digit_images:
        if path.suffix == ".png" and "large" not in path.name:  # lossless and unresized: exact
            assert torch.equal(load_image(path), test_set[0][index])


@pytest.mark.parametrize("model_arg", ["run-dir", MODEL_FILE, TORCHSCRIPT_FILE, "bare-model-pt"])
def test_predict_prints_the_right_digit(
    model_arg, trained, export_output, digit_images, tmp_path, capsys
):
    run_dir = trained[0]
    if model_arg == "run-dir":
        model = run_dir
    elif model_arg == "bare-model-pt":  # no config.toml beside it: the default architecture
        model = tmp_path / "bare" / MODEL_FILE
        model.parent.mkdir()
        shutil.copy(run_dir / MODEL_FILE, model)
    else:
        model = run_dir / model_arg
    assert run_cli("predict", model, *(path for path, _, _ in digit_images)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(digit_images)
    for line, (path, label, _) in zip(lines, digit_images, strict=True):
        match = PREDICTION.match(line)
        assert match and match["path"] == str(path), line
        assert int(match["digit"]) == label, line
        assert float(match["p"]) > 0.9, line


@pytest.mark.parametrize(
    ("model", "image", "expected"),
    [
        ("run", "missing.png", "missing.png not found"),
        ("run", "notes.txt", "is not an image"),
        ("missing-run", "digit.png", "missing-run not found"),
        ("digit.png", "digit.png", "is not a dpfl 'cnn' model"),
        ("notes.txt", "digit.png", "is not a dpfl 'cnn' model"),
    ],
)
def test_user_errors_are_one_line(model, image, expected, trained, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "digit.png")
    model_path = trained[0] if model == "run" else tmp_path / model
    with pytest.raises(DpflError) as err:
        run_cli("predict", model_path, tmp_path / image)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_export_refuses_a_torchscript_file(trained, export_output):
    with pytest.raises(DpflError, match="already a TorchScript export"):
        run_cli("export", trained[0] / TORCHSCRIPT_FILE)


@pytest.fixture(scope="module")
def scatnet_run(data_dir, tmp_path_factory):
    """A run directory holding a ScatterNet whose head was briefly trained, as a finished run leaves it."""
    images, labels = (t[:TRAIN_IMAGES] for t in load_mnist(data_dir, train=True).tensors)
    model = build_model("scatnet", seed=0)
    features = ScatterNet.fixed_input(images)
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS // 3):
        index = torch.randint(0, TRAIN_IMAGES, (BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model.head(features[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run_dir = tmp_path_factory.mktemp("scatnet-run")
    torch.save(model.state_dict(), run_dir / MODEL_FILE)
    config = RunConfig.from_mapping({"name": "card", "model": "scatnet", "num-clients": 4, "data-dir": str(data_dir)})
    (run_dir / CONFIG_FILE).write_text(tomli_w.dumps(config.to_flat()))
    summary = {"rounds-completed": 10, "test-accuracy": 0.9731, "dp-mode": "local", "privacy-unit": "example", "epsilon": 1.9924, "delta": 1e-5}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert run_cli("export", run_dir) == 0
    return run_dir, model.eval(), out.getvalue()


def test_the_default_model_exports_whole_and_its_exports_agree(scatnet_run, test_set):
    """ScatterNet, fixed front-end included: TorchScript and onnxruntime give PyTorch's predictions."""
    onnxruntime = pytest.importorskip("onnxruntime")
    run_dir, model, output = scatnet_run
    assert re.search(r"parameters\s+39,700\n", output) and "latency onnxruntime" in output
    images, labels = (t[:1000] for t in test_set)
    expected = batched_logits(model, images, batch_size=250)
    assert (expected.argmax(1) == labels).float().mean() > 0.9
    scripted = batched_logits(load_torchscript(run_dir / TORCHSCRIPT_FILE), images, batch_size=250)
    session = onnxruntime.InferenceSession(str(run_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    onnx = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    for actual in (scripted, onnx):
        assert torch.equal(actual.argmax(1), expected.argmax(1))
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_the_model_card_says_what_the_model_is_and_its_loading_lines_work(scatnet_run, test_set):
    run_dir, model, _ = scatnet_run
    card = (run_dir / MODEL_CARD_FILE).read_text()
    for fact in ("ScatterNet, 39,700 trained parameters", "60,000 MNIST training images, cut into 4 client shards (iid)", "clients released only model updates noised by DP-SGD",
                 "(ε = 1.992, δ = 1e-05)-differential privacy per example", "accountant prv", "97.31 % on mnist-test", "(N, 1, 28, 28)"):
        assert fact in card, fact
    # The card's TorchScript lines, run as a user would: without any dpfl code importable.
    snippet = card.split("```python\n")[1].split("```")[0]
    script = (
        "import sys, torch\n"
        "for package in ('common', 'server', 'client', 'simulations', 'kymatio', 'opacus'):\n"
        "    sys.modules[package] = None\n"
        f"images = torch.load({str(run_dir / 'images.pt')!r})\n" + snippet + "print(digits.tolist())\n"
    )
    torch.save(test_set[0][:5], run_dir / "images.pt")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=run_dir, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(batched_logits(model, test_set[0][:5]).argmax(1).tolist())


def test_predict_serves_the_export_without_kymatio_or_opacus(scatnet_run, digit_images):
    run_dir, _, _ = scatnet_run
    script = (
        "import sys\n"
        "sys.modules['kymatio'] = sys.modules['opacus'] = None  # importing either now fails\n"
        "from simulations.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    images = [str(path) for path, _, _ in digit_images]
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script, "predict", str(run_dir), *images], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    digits = [int(PREDICTION.match(line)["digit"]) for line in result.stdout.splitlines()]
    assert digits == [label for _, label, _ in digit_images]


def test_predict_ignores_an_export_older_than_the_model(scatnet_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(scatnet_run[0], run_dir)
    assert isinstance(load_predictor(run_dir), torch.jit.ScriptModule)
    (run_dir / MODEL_FILE).touch()  # trained on after the export (a resumed run)
    export = run_dir / TORCHSCRIPT_FILE
    os.utime(export, (export.stat().st_atime, (run_dir / MODEL_FILE).stat().st_mtime - 10))
    assert isinstance(load_predictor(run_dir), ScatterNet)


@pytest.mark.slow
def test_a_trained_scatnet_run_exports_with_its_int8_variant_and_serves(tmp_path, test_set):
    """A real (smoke-sized, DP-trained) ScatterNet run: export with int8, exports agree on the whole test set."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from simulations.engine import simulate
    from simulations.presets import load_preset

    overrides = [f"output-dir={tmp_path}", "model=scatnet", "learning-rate=16", "max-grad-norm=0.1", "batch-size=250"]
    summary = simulate(load_preset("smoke", overrides))
    run_dir = Path(summary["run-dir"])
    report = export_model(run_dir, int8=True)
    assert set(report.accuracy) == {"onnxruntime", "onnxruntime int8"}
    # The server scored half-precision features; the export computes them in float32.
    assert report.accuracy["onnxruntime"] == pytest.approx(summary["test-accuracy"], abs=2e-3)
    kept = (run_dir / INT8_ONNX_FILE).is_file()
    assert kept == (report.accuracy["onnxruntime"] - report.accuracy["onnxruntime int8"] <= INT8_ACCURACY_TOLERANCE)
    assert any(note.startswith("int8 kept" if kept else "int8 dropped") for note in report.notes)

    images = test_set[0]
    expected = batched_logits(load_model(run_dir), images, batch_size=1000)
    scripted = batched_logits(load_torchscript(run_dir / TORCHSCRIPT_FILE), images, batch_size=1000)
    session = onnxruntime.InferenceSession(str(run_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    onnx = batched_logits(lambda batch: torch.from_numpy(session.run(None, {"image": batch.numpy()})[0]), images, 1000)
    for actual in (scripted, onnx):
        assert torch.equal(actual.argmax(1), expected.argmax(1))  # all 10,000 test images
    assert "per example" in (run_dir / MODEL_CARD_FILE).read_text()
