"""One typed schema for the run config, the node config and the presets.

Keys are flat and kebab-case like Flower's (`num-server-rounds`, `target-epsilon`), so the
same names work in `pyproject.toml`, in preset TOML files, in `flwr run --run-config` and in
`dpfl simulate --set`. Internally the run config is split into typed sections (federation,
data, training, privacy) in the spirit of jax_privacy: privacy parameters stay apart from
training parameters, and accounting can be computed from them before any training starts.

Every value is checked once, at start-up; a bad one stops the run with a single line that
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

#: Number of images in the MNIST training set; the most samples any run can shard.
TRAIN_SET_SIZE = 60_000

Value = bool | int | float | str


def _option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    allow_inf: bool = False,
) -> Any:
    """A schema field: its default, a one-line meaning, and the allowed range or choices."""
    return field(
        default=default,
        metadata={
            "help": help,
            "low": low,
            "high": high,
            "low_open": low_open,
            "high_open": high_open,
            "choices": choices,
            "allow_inf": allow_inf,
        },
    )


@dataclass(frozen=True)
class FederationConfig:
    """How many clients take part and for how long."""

    num_clients: int = _option(10, "number of simulated clients (SuperNodes)", low=1)
    num_server_rounds: int = _option(10, "federated rounds", low=1)
    fraction_train: float = _option(
        1.0, "fraction of clients sampled each round", low=0.0, high=1.0, low_open=True
    )
    min_train_clients: int = _option(
        1, "fewest sound updates that make a round; with fewer the round is skipped", low=1
    )
    round_timeout: float = _option(
        3600.0,
        "seconds the server waits for a round's replies before going on with those it has",
        low=0.0,
        low_open=True,
    )


@dataclass(frozen=True)
class DataConfig:
    """Where MNIST lives and how the training set is cut into client shards."""

    data_dir: str = _option(
        "", "directory holding MNIST/raw/*-ubyte; empty means $DPFL_DATA_DIR, else ./data"
    )
    partitioner: str = _option(
        "iid", "how shards are drawn", choices=("iid", "dirichlet")
    )
    dirichlet_alpha: float = _option(
        0.5, "label-skew concentration for the dirichlet partitioner", low=0.0, low_open=True
    )
    train_subset: int = _option(
        0, "use only this many training images (0 = all 60000)", low=0, high=TRAIN_SET_SIZE
    )
    validation_size: int = _option(
        0,
        "training images held out of every shard for tuning (`dpfl tune` evaluates on them); "
        "0 = none",
        low=0,
        high=TRAIN_SET_SIZE,
    )


@dataclass(frozen=True)
class TrainingConfig:
    """Local DP-SGD on each client."""

    model: str = _option(
        "cnn",
        "model architecture: cnn (small tanh CNN) or scatnet (fixed ScatterNet features + linear)",
        choices=("cnn", "scatnet"),
    )
    batch_size: int = _option(
        600, "expected batch size (Poisson sampling draws each example with rate B/n)", low=1
    )
    local_epochs: int = _option(3, "local epochs per round", low=1)
    learning_rate: float = _option(2.0, "SGD learning rate", low=0.0, low_open=True)
    momentum: float = _option(0.0, "SGD momentum", low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class PrivacyConfig:
    """The per-client (epsilon, delta) budget and how it is spent and counted."""

    target_epsilon: float = _option(
        2.0,
        "each client's lifetime epsilon; inf trains without privacy (same code path, labelled)",
        low=0.0,
        low_open=True,
        allow_inf=True,
    )
    noise_multiplier: float = _option(
        0.0,
        "fixed DP-SGD noise multiplier instead of planning one from target-epsilon (0 = plan); "
        "target-epsilon then only caps what may be spent",
        low=0.0,
    )
    target_delta: float = _option(
        1e-5, "each client's delta", low=0.0, high=1.0, low_open=True, high_open=True
    )
    max_grad_norm: float = _option(
        1.0, "per-sample gradient clipping norm", low=0.0, low_open=True
    )
    accountant: str = _option(
        "prv",
        "Opacus privacy accountant; both are upper bounds (Opacus' gdp is an approximation, "
        "so it may not enforce a budget)",
        choices=("prv", "rdp"),
    )
    ledger_dir: str = _option(
        "",
        "simulations only: the privacy ledger of the simulated data set, so spent budget "
        "carries over to later runs on the same records; empty: the run directory's ledgers/. "
        "Real clients ignore it and use their node config's ledger-dir",
    )
    dp_mode: str = _option(
        "local",
        "local: each client runs DP-SGD (example-level epsilon; the server need not be "
        "trusted); central: the server clips client updates and noises their average "
        "(client-level epsilon; the server sees the updates and must be trusted)",
        choices=("local", "central"),
    )
    central_clipping: str = _option(
        "server",
        "central DP: where each client's model update is clipped (Flower's server-side or "
        "client-side fixed-clipping wrapper)",
        choices=("server", "client"),
    )
    central_noise_multiplier: float = _option(
        1.0,
        "central DP: sigma; the sum of the clipped updates over the planned m clients gets "
        "noise of std sigma * central-clipping-norm / m",
        low=0.0,
    )
    central_clipping_norm: float = _option(
        2.0, "central DP: L2 bound on each client's model update per round", low=0.0, low_open=True
    )


#: SecAgg+ masks with integers modulo 2**32 (Flower's `modulus_range`); the masked sum of the
#: round's quantised updates must stay below it.
SECAGG_MODULUS = 2**32


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+: the server learns only the weighted sum of the clients' models.

    Fractions, as Flower's `SecAggPlusWorkflow` reads a float, so one setting fits any number
    of clients per round. SecAgg+ quantises the full model parameters after clipping them to
    +-secagg-clipping-range; the default is several times the largest weight of the trained CNN.
    """

    secure_aggregation: bool = _option(
        False, "aggregate with SecAgg+, so the server sees only the sum of the clients' models"
    )
    secagg_num_shares: float = _option(
        1.0,
        "SecAgg+ neighbourhood: fraction of the round's clients each client secret-shares its "
        "keys with (1 = all, classic SecAgg)",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    secagg_reconstruction_threshold: float = _option(
        0.67,
        "fraction of a client's shares needed to rebuild its masks; higher is safer against a "
        "colluding server, lower tolerates more clients dropping out",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    secagg_clipping_range: float = _option(
        8.0, "model parameters are clipped to +-this before quantisation", low=0.0, low_open=True
    )
    secagg_quantization_range: int = _option(
        2**22, "integer levels a parameter is quantised to (precision: 2*clipping/this)", low=2
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs; the resolved form is saved as `config.toml`."""

    name: str = _option("run", "run name, used in the run directory's name")
    output_dir: str = _option("outputs", "where run directories are created")
    seed: int = _option(0, "fixes partitioning, initialisation and client sampling", low=0)
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build and validate a run config from flat kebab-case keys; missing keys keep defaults."""
        config = _build(cls, values)
        _check_run(config)
        return config

    def to_flat(self) -> dict[str, Value]:
        """Flat kebab-case keys, as Flower's run config and `config.toml` hold them."""
        return {key: value for key, value, _ in _walk(self)}

    def total_train_examples(self) -> int:
        """How many training images are split among the clients (held-out validation excluded)."""
        return self.data.train_subset or (TRAIN_SET_SIZE - self.data.validation_size)


@dataclass(frozen=True)
class NodeConfig:
    """What a client (SuperNode) owns: its shard, its data and its own privacy budget.

    `target-epsilon` / `target-delta` here win over the run config: the server proposes,
    the client decides how much of its data's privacy it is willing to spend.
    """

    partition_id: int = _option(0, "which shard of the training set this client holds", low=0)
    num_partitions: int = _option(1, "how many shards the training set is cut into", low=1)
    target_epsilon: float | None = _option(
        None, "this client's own epsilon budget", low=0.0, low_open=True, allow_inf=True
    )
    target_delta: float | None = _option(
        None, "this client's own delta", low=0.0, high=1.0, low_open=True, high_open=True
    )
    data_dir: str = _option("", "this client's MNIST directory; empty means the run's")
    ledger_dir: str = _option(
        "",
        "directory of this client's privacy ledger, kept across runs; a real client refuses "
        "to train without one",
    )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodeConfig:
        """Build and validate a node config from flat kebab-case keys."""
        config = _build(cls, values)
        if config.partition_id >= config.num_partitions:
            raise ConfigError(
                f"node config partition-id = {config.partition_id} is invalid: must be below "
                f"num-partitions = {config.num_partitions}"
            )
        return config


def kebab(name: str) -> str:
    """`num_server_rounds` -> `num-server-rounds`."""
    return name.replace("_", "-")


def _walk(config: Any) -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """Yield (key, value, field) for every leaf option of a config dataclass."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value)
        else:
            yield kebab(f.name), value, f


def _leaf_fields(cls: type) -> dict[str, tuple[tuple[str, ...], dataclasses.Field]]:
    """Map each flat key to (path of attribute names, field) for a config class."""
    leaves: dict[str, tuple[tuple[str, ...], dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            for key, (path, leaf) in _leaf_fields(f.default_factory).items():
                leaves[key] = ((f.name, *path), leaf)
        else:
            leaves[kebab(f.name)] = ((f.name,), f)
    return leaves


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    leaves = _leaf_fields(cls)
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(leaves))}"
        )
    nested: dict[str, Any] = {}
    for key, raw in values.items():
        path, leaf = leaves[key]
        target = nested
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = _coerce(key, raw, leaf)
    return _instantiate(cls, nested)


def _instantiate(cls: type, nested: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in nested:
            continue
        value = nested[f.name]
        kwargs[f.name] = _instantiate(f.default_factory, value) if isinstance(value, dict) else value
    return cls(**kwargs)


def _leaf_type(leaf: dataclasses.Field) -> type:
    """The scalar type of a field annotated `bool`, `int`, `float`, `str` or `float | None`."""
    annotation = str(leaf.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return typ
    raise TypeError(f"unsupported config annotation {annotation}")


def _describe(leaf: dataclasses.Field, typ: type) -> str:
    meta = leaf.metadata
    if meta["choices"]:
        return "one of: " + ", ".join(meta["choices"])
    if typ is bool:
        return "true or false"
    kind = "an integer" if typ is int else "a number" if typ is float else "a string"
    if meta["allow_inf"]:
        kind += " (or inf)"
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        left = "(" if meta["low_open"] else "["
        right = ")" if meta["high_open"] else "]"
        return f"{kind} in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"{kind} {'>' if meta['low_open'] else '>='} {low:g}"
    return kind


def _coerce(key: str, raw: Any, leaf: dataclasses.Field) -> Value | None:
    """Convert one raw value (typed from TOML, or a string from the command line) and check it."""
    typ = _leaf_type(leaf)
    allowed = _describe(leaf, typ)

    def bad() -> ConfigError:
        return ConfigError(f"{key} = {raw!r} is invalid: must be {allowed}")

    if typ is bool:
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        if not isinstance(raw, bool):
            raise bad()
        return raw
    if isinstance(raw, bool):
        raise bad()
    if typ is str:
        if not isinstance(raw, str):
            raise bad()
        value: Value = raw
    elif isinstance(raw, str):
        try:
            value = typ(raw.strip())
        except ValueError:
            raise bad() from None
    elif typ is int and isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, (int, float)) and not (typ is int and isinstance(raw, float)):
        value = typ(raw)
    else:
        raise bad()

    meta = leaf.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise bad()
    if isinstance(value, float) and not math.isfinite(value):
        if not (meta["allow_inf"] and value == math.inf):
            raise bad()
    if isinstance(value, (int, float)):
        low, high = meta["low"], meta["high"]
        if low is not None and (value < low or (meta["low_open"] and value == low)):
            raise bad()
        if high is not None and (value > high or (meta["high_open"] and value == high)):
            raise bad()
    return value


def _check_run(config: RunConfig) -> None:
    """Checks that involve more than one key."""
    examples = config.total_train_examples()
    clients = config.federation.num_clients
    left = TRAIN_SET_SIZE - config.data.validation_size
    if left < max(config.data.train_subset, 1):
        raise ConfigError(
            f"validation-size = {config.data.validation_size} is invalid: it leaves {left} of the "
            f"{TRAIN_SET_SIZE} training images to train on"
            + (f", fewer than train-subset = {config.data.train_subset}" if config.data.train_subset else "")
            + "; lower it"
        )
    if config.federation.min_train_clients > clients:
        raise ConfigError(
            f"min-train-clients = {config.federation.min_train_clients} is invalid: more than "
            f"num-clients = {clients}; no round could ever be aggregated"
        )
    if clients > examples:
        raise ConfigError(
            f"num-clients = {clients} is invalid: more clients than "
            f"training samples ({examples}); lower num-clients or raise train-subset"
        )
    privacy = config.privacy
    if privacy.noise_multiplier > 0 and math.isinf(privacy.target_epsilon):
        raise ConfigError(
            f"noise-multiplier = {privacy.noise_multiplier:g} contradicts target-epsilon = inf "
            "(non-private training); set one or the other"
        )
    if privacy.dp_mode == "central":
        _check_central(privacy, clients)
    else:
        check_delta(privacy.target_delta, examples // clients)
    _check_secure_aggregation(config)


def _check_central(privacy: PrivacyConfig, clients: int) -> None:
    """Central DP protects whole clients: delta and noise are judged per client."""
    if privacy.noise_multiplier > 0:
        raise ConfigError(
            f"noise-multiplier = {privacy.noise_multiplier:g} does not apply with dp-mode = "
            "central (the server adds the noise: set central-noise-multiplier); set it to 0"
        )
    if privacy.central_noise_multiplier == 0 and math.isfinite(privacy.target_epsilon):
        raise ConfigError(
            f"central-noise-multiplier = 0 releases client updates without noise, which no "
            f"target-epsilon = {privacy.target_epsilon:g} allows; raise it, or set "
            "target-epsilon = inf to train without privacy"
        )
    if privacy.target_delta >= 1 / clients:
        raise ConfigError(
            f"target-delta = {privacy.target_delta:g} is invalid with dp-mode = central: it must "
            f"be below 1/num-clients = {1 / clients:.3g}, or a run could publish a whole "
            "client's update in the clear and still meet it; lower target-delta"
        )


def clients_per_round(federation: FederationConfig) -> int:
    """How many clients the server samples each round (Flower's FedAvg rule)."""
    return max(1, math.floor(federation.fraction_train * federation.num_clients))


def _check_secure_aggregation(config: RunConfig) -> None:
    """SecAgg+ needs two clients to hide one among, and a masked sum that cannot wrap around."""
    if not config.secagg.secure_aggregation:
        return
    if config.privacy.dp_mode == "central":
        raise ConfigError(
            "secure-aggregation = true cannot be combined with dp-mode = central: Flower's "
            "central-DP wrappers and SecAgg+ run on different workflows; use dp-mode = local"
        )
    sampled = clients_per_round(config.federation)
    if sampled < 2:
        raise ConfigError(
            f"secure-aggregation = true is invalid with {sampled} client per round (num-clients = "
            f"{config.federation.num_clients}, fraction-train = {config.federation.fraction_train:g}): "
            "a sum over one client is that client's model; sample at least 2"
        )
    levels = config.secagg.secagg_quantization_range
    if sampled * levels >= SECAGG_MODULUS:
        raise ConfigError(
            f"secagg-quantization-range = {levels} is invalid: the masked sum of {sampled} clients "
            f"would wrap around the 2**32 modulus; must be at most {(SECAGG_MODULUS - 1) // sampled}"
        )


def check_delta(delta: float, shard_size: int) -> None:
    """Refuse a delta that lets a mechanism leak a whole example of a shard outright.

    (epsilon, delta)-DP with delta >= 1/n is met by publishing one random example of n in the
    clear; meaningful guarantees need delta well below 1/n.
    """
    if math.isfinite(delta) and shard_size > 0 and delta >= 1 / shard_size:
        raise ConfigError(
            f"target-delta = {delta:g} is invalid: it must be below 1/(shard size) = "
            f"1/{shard_size} = {1 / shard_size:.3g}, or a run could publish a whole example in "
            "the clear and still meet it; lower target-delta (1e-5 is usual)"
        )


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse `key=value` strings from the command line."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is invalid: write it as key=value, e.g. num-server-rounds=3")
        overrides[key.strip()] = value
    return overrides


def load_toml(path: Path) -> dict[str, Any]:
    """Read a flat TOML config file, with one-line errors for unreadable or nested files."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; is it the right file?") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    if not values:
        raise ConfigError(f"config file {path} is empty; write at least name = \"...\"")
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"config file {path}: table [{key}] is not allowed; write its keys flat, "
                "e.g. target-epsilon = 2.0"
            )
    return values
