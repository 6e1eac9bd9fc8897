import tomllib

import pytest

from common.config import ClientRunConfig, NodeConfig, RunConfig, load_toml, parse_overrides
from common.config.reference import stale_files
from common.errors import ConfigError
from simulations.presets import available_presets, load_preset, preset_path
from tests.conftest import REPO


def test_the_schemas_defaults_are_the_default_run():
    config = RunConfig.from_mapping({})
    assert config == RunConfig() == load_preset(None) == load_preset("mnist-eps2")
    assert (config.training.model, config.training.batch_size, config.privacy.max_grad_norm) == ("scatnet+fonts", 1200, 0.1)
    assert config.privacy.accountant == "prv"
    assert config.total_train_examples() == 60_000


def test_presets_list_only_what_they_change():
    """A preset that repeats a default would go stale when the schema's default moves."""
    defaults = RunConfig().to_flat()
    for name in available_presets():
        repeated = {key for key, value in load_toml(preset_path(name)).items() if key != "name" and defaults[key] == value}
        assert not repeated, f"preset {name} repeats defaults: {sorted(repeated)}"


def test_flat_round_trip():
    config = RunConfig.from_mapping({"target-epsilon": 3.5, "num-clients": 4, "partitioner": "dirichlet"})
    assert RunConfig.from_mapping(config.to_flat()) == config


def test_generated_app_config_and_reference_equal_the_schema():
    """`pyproject.toml`'s app config and docs/configuration.md come from the schema (`dpfl config --write`)."""
    assert stale_files(REPO) == []
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # `flwr run .` trains the default run, and accepts `--run-config` overrides for every key.
    assert RunConfig.from_mapping(pyproject) == RunConfig()
    assert list(pyproject) == RunConfig.keys()
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert all(f"| `{key}` |" in reference for key in [*RunConfig.keys(), *NodeConfig.keys()])


def test_a_stale_generated_file_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    for name in ("pyproject.toml", "docs/configuration.md"):
        (tmp_path / name).write_text((REPO / name).read_text())
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("batch-size = 1200", "batch-size = 600"))
    assert stale_files(tmp_path) == [pyproject]


def test_a_client_validates_only_the_keys_it_is_sent():
    sent = RunConfig().for_clients().to_flat()
    assert set(sent) == set(ClientRunConfig.keys()) < set(RunConfig.keys())
    assert ClientRunConfig.from_mapping(sent) == RunConfig().for_clients()
    with pytest.raises(ConfigError, match="unknown config key 'secagg-quantization-range'"):
        ClientRunConfig.from_mapping({**sent, "secagg-quantization-range": 2**31})
    with pytest.raises(ConfigError, match="noise-multiplier = 1 contradicts target-epsilon = inf"):
        ClientRunConfig.from_mapping({**sent, "target-epsilon": "inf", "noise-multiplier": 1.0})


def test_string_overrides_are_typed():
    config = load_preset("smoke", ["target-epsilon=1.5", "num-server-rounds=4", "accountant=rdp"])
    assert config.privacy.target_epsilon == 1.5
    assert config.federation.num_server_rounds == 4
    assert config.privacy.accountant == "rdp"
    assert load_preset("smoke", ["secure-aggregation=true"]).secagg.secure_aggregation is True
    assert load_preset("smoke", ["secure-aggregation=False"]).secagg.secure_aggregation is False


def test_secure_aggregation_is_off_by_default_and_checked_only_when_on():
    assert RunConfig().secagg.secure_aggregation is False
    # One client per round is fine without SecAgg+; the quantisation settings are then unused.
    assert RunConfig.from_mapping({"num-clients": 1, "secagg-quantization-range": 2**31}).federation.num_clients == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"target-epsilon": -1.0}, "target-epsilon = -1.0 is invalid: must be a number (or inf) > 0"),
        ({"target-epsilon": "abc"}, "target-epsilon = 'abc' is invalid: must be a number (or inf) > 0"),
        ({"target-epsilon": "nan"}, "target-epsilon = 'nan' is invalid"),
        ({"target-delta": 1.0}, "target-delta = 1.0 is invalid: must be a number in (0, 1)"),
        ({"target-delta": 2}, "target-delta = 2 is invalid: must be a number in (0, 1)"),
        ({"num-clients": 0}, "num-clients = 0 is invalid: must be an integer >= 1"),
        ({"num-clients": "ten"}, "num-clients = 'ten' is invalid: must be an integer >= 1"),
        ({"num-clients": 2.5}, "num-clients = 2.5 is invalid: must be an integer >= 1"),
        ({"num-clients": True}, "num-clients = True is invalid"),
        ({"num-clients": 101, "train-subset": 100}, "num-clients = 101 is invalid: more clients than training samples (100)"),
        ({"num-clients": 60_001}, "more clients than training samples (60000)"),
        ({"partitioner": "shards"}, "partitioner = 'shards' is invalid: must be one of: iid, dirichlet"),
        ({"accountant": "moments"}, "accountant = 'moments' is invalid: must be one of: prv, rdp"),
        ({"fraction-train": 0}, "fraction-train = 0 is invalid: must be a number in (0, 1]"),
        ({"train-subset": 70_000}, "train-subset = 70000 is invalid: MNIST has 60000 training images"),
        ({"batch-size": "64x"}, "batch-size = '64x' is invalid"),
        ({"model": 3}, "model = 3 is invalid: must be a string"),
        ({"model": "resnet"}, "model = 'resnet' is invalid: must be cnn, scatnet, scatnet+fonts or package.module:factory"),
        ({"name": "../../x"}, "name = '../../x' is invalid: it names the run's directory inside output-dir"),
        ({"name": ".hidden"}, "name = '.hidden' is invalid"),
        ({"dataset": "folder:"}, "dataset = 'folder:' is invalid: must be mnist, folder:PATH or npz:PATH"),
        ({"dataset": "imagenet"}, "dataset = 'imagenet' is invalid: must be mnist, folder:PATH or npz:PATH"),
        ({"eval-dataset": "mnist"}, "eval-dataset = 'mnist' is invalid: must be mnist-test, none, folder:PATH or npz:PATH"),
        ({"num-classes": 1}, "num-classes = 1 is invalid: must be an integer >= 2"),
        ({"target-epsilom": 2.0}, "unknown config key 'target-epsilom'; known keys:"),
        ({"min-train-clients": 11}, "min-train-clients = 11 is invalid: more than num-clients = 10"),
        ({"secure-aggregation": "yes"}, "secure-aggregation = 'yes' is invalid: must be true or false"),
        ({"secure-aggregation": 1}, "secure-aggregation = 1 is invalid: must be true or false"),
        ({"secagg-num-shares": 0}, "secagg-num-shares = 0 is invalid: must be a number in (0, 1]"),
        ({"secagg-num-shares": 3}, "secagg-num-shares = 3 is invalid: must be a number in (0, 1]"),
        ({"secagg-reconstruction-threshold": 1.5}, "secagg-reconstruction-threshold = 1.5 is invalid: must be a number in (0, 1]"),
        ({"secagg-clipping-range": 0}, "secagg-clipping-range = 0 is invalid: must be a number > 0"),
        ({"secagg-quantization-range": 1}, "secagg-quantization-range = 1 is invalid: must be an integer >= 2"),
        ({"secagg-quantization-range": "2**22"}, "secagg-quantization-range = '2**22' is invalid: must be an integer >= 2"),
        (
            {"secure-aggregation": True, "num-clients": 1},
            "secure-aggregation = true is invalid with 1 client per round (num-clients = 1, fraction-train = 1)",
        ),
        (
            {"secure-aggregation": True, "fraction-train": 0.1},
            "secure-aggregation = true is invalid with 1 client per round (num-clients = 10, fraction-train = 0.1)",
        ),
        (
            {"secure-aggregation": True, "secagg-quantization-range": 2**30},
            "secagg-quantization-range = 1073741824 is invalid: the masked sum of 10 clients would wrap "
            "around the 2**32 modulus; must be at most 429496729",
        ),
    ],
)
def test_bad_values_name_key_value_and_range(values, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_node_config_checks_its_partition():
    assert NodeConfig.from_mapping({"partition-id": 3, "num-partitions": 10}).partition_id == 3
    with pytest.raises(ConfigError, match="partition-id = 10 is invalid: must be below num-partitions = 10"):
        NodeConfig.from_mapping({"partition-id": 10, "num-partitions": 10})
    with pytest.raises(ConfigError, match="unknown config key 'budget'"):
        NodeConfig.from_mapping({"budget": 1.0})


def test_malformed_override_and_preset_errors(tmp_path):
    with pytest.raises(ConfigError, match="write it as key=value"):
        parse_overrides(["num-clients"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: .*mnist-eps2.*smoke"):
        load_preset("nope")
    broken = tmp_path / "broken.toml"
    broken.write_text("num-clients = [\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_preset(str(broken))
    nested = tmp_path / "nested.toml"
    nested.write_text("[privacy]\ntarget-epsilon = 1.0\n")
    with pytest.raises(ConfigError, match=r"table \[privacy\] is not allowed"):
        load_preset(str(nested))
