"""Malformed configs, fed through the real command line: one line each, never a traceback."""

import random

import pytest

from common.config import RunConfig
from common.errors import ConfigError
from simulations.cli import main

VALID = RunConfig.from_mapping({"name": "fuzz"}).to_flat()

BROKEN_FILES = {
    "empty": "",
    "only-comment": "# nothing here\n",
    "unclosed-array": "num-clients = [\n",
    "unclosed-string": 'name = "abc\n',
    "duplicate-key": "num-clients = 2\nnum-clients = 3\n",
    "bare-word": "num-clients = ten\n",
    "missing-value": "num-clients =\n",
    "nested-table": "[privacy]\ntarget-epsilon = 1.0\n",
    "array-of-tables": "[[clients]]\nid = 1\n",
    "inline-table": "target-epsilon = { value = 1.0 }\n",
    "not-toml": "{\"num-clients\": 2}\n",
}

# (key, value as TOML) pairs that parse but break the schema.
BAD_VALUES = [
    ("num-clients", "0"), ("num-clients", "-3"), ("num-clients", "2.5"), ("num-clients", '"ten"'),
    ("num-clients", "true"), ("num-clients", "[1, 2]"), ("num-clients", "70000"),
    ("num-server-rounds", "0"), ("fraction-train", "0.0"), ("fraction-train", "1.5"),
    ("target-epsilon", "0.0"), ("target-epsilon", "-inf"), ("target-epsilon", "nan"), ("target-epsilon", '"two"'),
    ("target-delta", "0.0"), ("target-delta", "1.0"), ("target-delta", "0.5"),
    ("max-grad-norm", "0"), ("noise-multiplier", "-1.0"), ("accountant", '"moments"'), ("accountant", "3"),
    ("partitioner", '"shards"'), ("dirichlet-alpha", "0"), ("train-subset", "-1"), ("batch-size", "0"),
    ("learning-rate", "0"), ("momentum", "1.0"), ("model", '"resnet"'), ("seed", "-1"),
    ("data-dir", "42"), ("name", "1979-05-27T07:32:00Z"), ("target-epsilon-typo", "2.0"),
    ("secure-aggregation", '"yes"'), ("secure-aggregation", "1"), ("secagg-num-shares", "0"),
    ("secagg-reconstruction-threshold", "2.0"), ("secagg-clipping-range", "-8.0"),
    ("secagg-quantization-range", "1.5"),
]


def run(tmp_path, text: str | bytes, capsys) -> tuple[int, str]:
    path = tmp_path / "config.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = main(["simulate", "--preset", str(path)])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err):
    assert code == 2
    assert err.startswith("dpfl: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_files(tmp_path, capsys, name):
    assert_one_line_error(*run(tmp_path, BROKEN_FILES[name], capsys))


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_values(tmp_path, capsys, key, value):
    code, err = run(tmp_path, f'name = "fuzz"\n{key} = {value}\n', capsys)
    assert_one_line_error(code, err)
    assert key in err


def test_random_garbage(tmp_path, capsys):
    rng = random.Random(0)
    for _ in range(30):
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        assert_one_line_error(*run(tmp_path, garbage, capsys))


def test_random_mutations_of_a_valid_config(tmp_path, capsys):
    """Replace one value of a valid config with a value of another key: each must be caught."""
    rng = random.Random(1)
    keys = list(VALID)
    for _ in range(40):
        key, donor = rng.sample(keys, 2)
        values = dict(VALID, **{key: VALID[donor]})
        try:
            RunConfig.from_mapping(values)
        except ConfigError:  # invalid: the command line must then say so in one line
            body = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in values.items())
            assert_one_line_error(*run(tmp_path, body, capsys))
