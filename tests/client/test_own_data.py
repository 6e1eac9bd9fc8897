"""A client's own data (an image folder or an npz file): it trains on it whole, its ledger follows
its records, and what it cannot use is refused before anything is charged or sent."""

import json
import math
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from client.ledger import LEDGER_FILE
from client.training import train_round
from common.config import NodeConfig, RunConfig
from common.data import load_mnist
from common.errors import ConfigError
from common.model import build_model

IMAGES = 200  # per client folder: 20 of each digit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_folder(root, images: torch.Tensor, labels: torch.Tensor, names=None):
    """Class folders of PNG files, as a user keeps them; a few in other sizes and colour modes."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / (names[int(label)] if names else str(int(label)))
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image[0].numpy())
        if i % 50 == 1:
            picture = picture.convert("RGB")
        elif i % 50 == 2:
            picture = picture.resize((56, 56), Image.Resampling.LANCZOS)
        picture.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits(data_dir):
    """400 MNIST training digits as uint8, 40 of each class, and their labels."""
    train = load_mnist(data_dir, train=True)
    raw = (train.tensors[0] * 0.3081 + 0.1307).mul(255).round().clamp(0, 255).to(torch.uint8)
    labels = train.tensors[1]
    index = torch.cat([torch.nonzero(labels == d)[:40, 0] for d in range(10)])
    return raw[index], labels[index]


def run_config(tiny_config, **changes) -> RunConfig:
    values = {**tiny_config.to_flat(), "num-server-rounds": 3, "batch-size": 40, **changes}
    return RunConfig.from_mapping(values)


def own_node(tmp_path, dataset, **changes) -> NodeConfig:
    """A real client: its own data, its own ledger and budget; no MNIST anywhere on its side."""
    values = {
        "dataset": dataset,
        "data-dir": str(tmp_path / "no-mnist-here"),
        "ledger-dir": str(tmp_path / "ledger"),
        "target-epsilon": 4.0,
        "target-delta": 1e-5,
        **changes,
    }
    return NodeConfig.from_mapping(values)


def ledger(tmp_path, name="ledger"):
    return json.loads((tmp_path / name / LEDGER_FILE).read_text())


def test_a_client_trains_on_its_own_folder_whole(tiny_config, digits, tmp_path):
    images, labels = digits
    folder = write_folder(tmp_path / "mine", images[:IMAGES], labels[:IMAGES])
    run = run_config(tiny_config).for_clients()
    state = build_model("cnn", seed=0).state_dict()
    outcome = train_round(state, run, own_node(tmp_path, f"folder:{folder}"), "run-1")
    assert outcome.refusal is None and outcome.num_examples == IMAGES  # all of it, no partition
    assert 0 < outcome.epsilon <= 4.0
    groups = ledger(tmp_path)["groups"]
    assert sum(group["records"] for group in groups) == IMAGES


def test_the_same_images_elsewhere_share_one_budget_and_new_images_start_fresh(tiny_config, digits, tmp_path):
    images, labels = digits
    first = write_folder(tmp_path / "first", images[:IMAGES], labels[:IMAGES])
    copy = shutil.copytree(first, tmp_path / "renamed-copy")
    fresh = write_folder(tmp_path / "fresh", images[IMAGES:], labels[IMAGES:])
    run = run_config(tiny_config).for_clients()
    state = build_model("cnn", seed=0).state_dict()
    once = train_round(state, run, own_node(tmp_path, f"folder:{first}"), "run-1")
    again = train_round(state, run, own_node(tmp_path, f"folder:{copy}"), "run-2")
    assert again.epsilon > once.epsilon  # the copy's records are the first folder's: composed
    new = train_round(state, run, own_node(tmp_path, f"folder:{fresh}"), "run-3")
    assert new.epsilon == pytest.approx(once.epsilon)  # unseen images start at zero
    assert sum(group["records"] for group in ledger(tmp_path)["groups"]) == 2 * IMAGES


def test_an_npz_file_trains_like_the_folder_it_came_from(tiny_config, digits, tmp_path):
    images, labels = digits
    np.savez(tmp_path / "mine.npz", x=images[:IMAGES, 0].numpy(), y=labels[:IMAGES].numpy())
    run = run_config(tiny_config).for_clients()
    outcome = train_round(build_model("cnn", seed=0).state_dict(), run, own_node(tmp_path, f"npz:{tmp_path / 'mine.npz'}"), "npz")
    assert outcome.refusal is None and outcome.num_examples == IMAGES


def test_labels_outside_num_classes_are_refused_before_any_charge(tiny_config, digits, tmp_path):
    images, labels = digits
    names = [f"class-{c:02d}" for c in range(12)]  # 12 classes on disk, the run says 10
    folder = write_folder(tmp_path / "twelve", images[:120], torch.arange(120) % 12, names)
    run = run_config(tiny_config).for_clients()
    outcome = train_round(build_model("cnn").state_dict(), run, own_node(tmp_path, f"folder:{folder}"), "run")
    assert outcome.state_dict is None
    assert outcome.refusal == "its data has labels outside num-classes = 10"  # no names, no counts
    assert math.isnan(outcome.epsilon) and not (tmp_path / "ledger" / LEDGER_FILE).exists()


def test_a_missing_folder_is_refused_and_its_path_stays_on_the_client(tiny_config, tmp_path):
    run = run_config(tiny_config).for_clients()
    outcome = train_round(build_model("cnn").state_dict(), run, own_node(tmp_path, f"folder:{tmp_path / 'gone'}"), "run")
    assert outcome.refusal == "it cannot load its training data (see its log)"
    assert str(tmp_path) not in outcome.refusal


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of model factories, importable as `user_models` (as a user's package would be)."""
    (tmp_path / "user_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def small():
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))

            def batchnorm():
                return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))

            def three_classes():
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))

            def colour_only():
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))

            def not_a_module():
                return "a string"

            class Leaky(nn.Module):
                # A buffer a forward pass fills from the data: it would travel without noise.

                def __init__(self):
                    super().__init__()
                    self.linear = nn.Linear(784, 10)
                    self.register_buffer("seen", torch.zeros(784))

                def forward(self, x):
                    self.seen = x.flatten(1).mean(0).detach()
                    return self.linear(x.flatten(1))

            def leaky():
                return Leaky()

            class Norm(nn.BatchNorm1d):
                pass

            def lazy_batchnorm():
                return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.LazyBatchNorm1d(), nn.Linear(16, 10))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("user_models", None)


def test_a_custom_model_trains_and_only_its_weights_travel(tiny_config, tmp_path, factories):
    config = run_config(tiny_config, model="user_models:small")
    run = config.for_clients()
    state = build_model(config.training.model, seed=0).state_dict()
    outcome = train_round(state, run, NodeConfig(partition_id=0, num_partitions=2, ledger_dir=str(tmp_path / "l")), "custom", simulated=True)
    assert outcome.refusal is None and set(outcome.state_dict) == set(state)
    assert any(not torch.equal(outcome.state_dict[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("user_models:batchnorm", "keeps state that is not a parameter (1.running_mean"),
        ("user_models:leaky", "keeps state that is not a parameter (seen)"),
        ("user_models:lazy_batchnorm", "keeps state that is not a parameter"),
        ("user_models:three_classes", "gives scores of shape (2, 3) for 2 images; with num-classes = 10 it must give (2, 10)"),
        ("user_models:colour_only", "does not accept the data's shape (N, 1, 28, 28)"),
        ("user_models:not_a_module", "returned a str, not a torch nn.Module"),
        ("user_models:missing", "user_models has no missing"),
        ("no_such_package.models:net", "cannot import no_such_package.models"),
    ],
)
def test_a_custom_model_that_cannot_work_is_one_line_before_training(model, expected, factories):
    with pytest.raises(ConfigError) as err:
        build_model(model)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_only_parameters_may_change_in_training(tiny_config):
    from client.training import _check_only_parameters_moved
    from common.errors import DpflError

    model = torch.nn.BatchNorm1d(3)  # what a model that dodged the checks could hold
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(8, 3))  # training mode: the running statistics follow the data
    with pytest.raises(DpflError, match="running_mean, running_var, num_batches_tracked, which are not parameters"):
        _check_only_parameters_moved(model, model.state_dict(), before)


def test_a_real_client_never_trains_on_a_path_the_server_proposes(tiny_config, digits, tmp_path):
    images, labels = digits
    folder = write_folder(tmp_path / "server-picked", images[:IMAGES], labels[:IMAGES])
    run = run_config(tiny_config, dataset=f"folder:{folder}").for_clients()
    mnist_client = NodeConfig.from_mapping({"partition-id": 0, "num-partitions": 2, "ledger-dir": str(tmp_path / "ledger"),
                                            "target-epsilon": 4.0, "target-delta": 1e-5})
    outcome = train_round(build_model("cnn").state_dict(), run, mnist_client, "probe")
    assert outcome.refusal == "it cannot load its training data (see its log)" and outcome.state_dict is None
    assert not (tmp_path / "ledger" / LEDGER_FILE).exists()


def test_a_record_present_twice_is_trained_once(tiny_config, digits, tmp_path):
    images, labels = digits
    folder = write_folder(tmp_path / "mine", images[:IMAGES], labels[:IMAGES])
    for path in list((folder / "3").glob("*.png"))[:5]:
        shutil.copy(path, path.with_name(f"copy-{path.name}"))
    run = run_config(tiny_config).for_clients()
    outcome = train_round(build_model("cnn", seed=0).state_dict(), run, own_node(tmp_path, f"folder:{folder}"), "dup")
    assert outcome.refusal is None and outcome.num_examples == IMAGES  # the five copies left out
    assert sum(group["records"] for group in ledger(tmp_path)["groups"]) == IMAGES


def test_a_delta_too_large_for_the_data_is_refused_without_its_size(tiny_config, digits, tmp_path):
    images, labels = digits
    folder = write_folder(tmp_path / "mine", images[:IMAGES], labels[:IMAGES])
    # A run on users' own data sets: the server cannot check delta against sizes it does not know.
    run = run_config(tiny_config, dataset="folder:/theirs", **{"target-delta": 0.01, "train-subset": 0}).for_clients()
    outcome = train_round(build_model("cnn").state_dict(), run, own_node(tmp_path, f"folder:{folder}", **{"target-delta": 0.01}), "d")
    assert outcome.refusal == "its delta is too large for its number of examples (see its log)"
    assert str(IMAGES) not in outcome.refusal


def test_declared_classes_are_compared_without_looking_at_the_data(tiny_config, digits, tmp_path):
    images, labels = digits
    folder = write_folder(tmp_path / "mine", images[:IMAGES], labels[:IMAGES])
    run = run_config(tiny_config, **{"num-classes": 12}, model="cnn").for_clients()
    node = own_node(tmp_path, f"folder:{folder}", **{"num-classes": 10})
    outcome = train_round(build_model("cnn", num_classes=12).state_dict(), run, node, "c")
    assert outcome.refusal == "it holds 10 classes, not num-classes = 12"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_a_simulation_cuts_a_users_data_set_among_its_clients(kind, tiny_config, digits, tmp_path, monkeypatch):
    """The whole path through Flower: a folder or an npz file as the run's dataset, and a custom model."""
    from simulations.engine import simulate

    images, labels = digits
    if kind == "folder":
        source = f"folder:{write_folder(tmp_path / 'data', images, labels)}"
    else:
        np.savez(tmp_path / "data.npz", x=images[:, 0].numpy(), y=labels.numpy())
        source = f"npz:{tmp_path / 'data.npz'}"
    (tmp_path / "user_models.py").write_text(
        "from torch import nn\n\ndef small():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the simulation's client processes import it too
    monkeypatch.syspath_prepend(str(tmp_path))
    config = run_config(
        tiny_config, dataset=source, model="user_models:small", **{"num-clients": 2, "train-subset": 0, "learning-rate": 0.5}
    )
    summary = simulate(config)
    assert summary["rounds-completed"] == 3 and 0 < summary["epsilon"] <= 4.0
    assert summary["test-accuracy"] > 0.3  # on MNIST's test set, from 400 of the user's images
    (ledger_file,) = (tmp_path / "outputs").glob(f"*/ledgers/{LEDGER_FILE}")
    assert sum(group["records"] for group in json.loads(ledger_file.read_text())["groups"]) == len(labels)
