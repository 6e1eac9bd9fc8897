"""Rules across keys: what no single key's range can say (a delta too large for the shards, a
SecAgg+ sum that would wrap around its modulus, noise that contradicts a non-private run)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from common.config.sections import (
    BUILT_IN_MODELS,
    MISLABELLED_CANARY,
    POISSON_SAMPLING,
    SECAGG_MODULUS,
    TRAIN_SET_SIZE,
    AuditConfig,
    CentralConfig,
    DataConfig,
    EvaluationConfig,
    FederationConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    TrainingConfig,
)
from common.errors import ConfigError

MNIST, FOLDER, NPZ = "mnist", "folder", "npz"
#: `eval-dataset` values besides a data source: MNIST's test set, or no central evaluation.
MNIST_TEST, NO_EVALUATION = "mnist-test", "none"
#: A run's name becomes a directory name inside output-dir: no separators, no leading dot.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Number of images in the MNIST test set, where mislabelled canaries come from.
TEST_SET_SIZE = 10_000
#: `package.module:factory`
MODEL_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def data_source(value: str, key: str, also: tuple[str, ...] = (MNIST,)) -> tuple[str, Path | None]:
    """A data-source value, parsed: (`mnist` or another of `also`, None), (`folder`, PATH) or (`npz`, PATH).

    Only the syntax: the files are read (and their errors reported) where the data is loaded.
    """
    kind, sep, path = value.partition(":")
    if not sep and value in also:
        return value, None
    if sep and kind in (FOLDER, NPZ) and path.strip():
        return kind, Path(path.strip()).expanduser()
    raise ConfigError(f"{key} = {value!r} is invalid: must be {', '.join(also)}, folder:PATH or npz:PATH")


def check_training(training: TrainingConfig) -> None:
    """A model is built in or named as `package.module:factory`."""
    if training.model not in BUILT_IN_MODELS and not MODEL_FACTORY.fullmatch(training.model):
        raise ConfigError(
            f"model = {training.model!r} is invalid: must be {', '.join(BUILT_IN_MODELS)} or "
            "package.module:factory (a function returning an nn.Module)"
        )


def total_train_examples(data: DataConfig) -> int | None:
    """How many training images are split among the clients (held-out validation excluded);
    None for a data set of the user's, whose size only its files know."""
    if data.dataset != MNIST:
        return data.train_subset or None
    return data.train_subset or (TRAIN_SET_SIZE - data.validation_size)


def clients_per_round(federation: FederationConfig) -> int:
    """How many clients the server samples each round (Flower's FedAvg rule)."""
    return max(1, math.floor(federation.fraction_train * federation.num_clients))


def check_client(data: DataConfig, training: TrainingConfig, privacy: PrivacyConfig) -> None:
    """The rules within what a client is sent: what it checks of a server's proposal."""
    data_source(data.dataset, "dataset")
    check_training(training)
    check_privacy(privacy)


def _check_mnist_sizes(data: DataConfig) -> None:
    for key, value in (("train-subset", data.train_subset), ("validation-size", data.validation_size)):
        if value > TRAIN_SET_SIZE:
            raise ConfigError(f"{key} = {value} is invalid: MNIST has {TRAIN_SET_SIZE} training images")
    left = TRAIN_SET_SIZE - data.validation_size
    if left < max(data.train_subset, 1):
        raise ConfigError(
            f"validation-size = {data.validation_size} is invalid: it leaves {left} of the "
            f"{TRAIN_SET_SIZE} training images to train on"
            + (f", fewer than train-subset = {data.train_subset}" if data.train_subset else "")
            + "; lower it"
        )


def check_privacy(privacy: PrivacyConfig) -> None:
    """The privacy section on its own."""
    if privacy.noise_multiplier > 0 and math.isinf(privacy.target_epsilon):
        raise ConfigError(
            f"noise-multiplier = {privacy.noise_multiplier:g} contradicts target-epsilon = inf "
            "(non-private training); set one or the other"
        )
    if privacy.noise_multiplier > 0 and privacy.dp_mode == "central":
        raise ConfigError(
            f"noise-multiplier = {privacy.noise_multiplier:g} does not apply with dp-mode = "
            "central (the server adds the noise: set central-noise-multiplier); set it to 0"
        )


def check_run(
    name: str,
    federation: FederationConfig,
    data: DataConfig,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    central: CentralConfig,
    evaluation: EvaluationConfig,
    secagg: SecureAggregationConfig,
) -> None:
    """Every rule across the keys of a whole run config."""
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"name = {name!r} is invalid: it names the run's directory inside output-dir, so use "
            "letters, digits, '.', '_' and '-' only, starting with a letter or digit"
        )
    check_client(data, training, privacy)
    data_source(evaluation.eval_dataset, "eval-dataset", also=(MNIST_TEST, NO_EVALUATION))
    examples = total_train_examples(data)
    clients = federation.num_clients
    if data.dataset == MNIST:
        _check_mnist_sizes(data)
    if federation.min_train_clients > clients:
        raise ConfigError(
            f"min-train-clients = {federation.min_train_clients} is invalid: more than "
            f"num-clients = {clients}; no round could ever be aggregated"
        )
    if examples is not None and clients > examples:
        raise ConfigError(
            f"num-clients = {clients} is invalid: more clients than "
            f"training samples ({examples}); lower num-clients or raise train-subset"
        )
    if central.client_sampling == POISSON_SAMPLING:
        _check_poisson(federation, privacy)
    if privacy.dp_mode == "central":
        _check_central(privacy, central, clients)
    elif examples is not None:  # otherwise each client checks delta against its real size
        check_delta(privacy.target_delta, examples // clients)
    _check_secure_aggregation(federation, privacy, secagg)


def _check_central(privacy: PrivacyConfig, central: CentralConfig, clients: int) -> None:
    """Central DP protects whole clients: delta and noise are judged per client."""
    if central.central_noise_multiplier == 0 and math.isfinite(privacy.target_epsilon):
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


def _check_poisson(federation: FederationConfig, privacy: PrivacyConfig) -> None:
    """Poisson client sampling is central DP's, and nothing may hang on how many were sampled."""
    if privacy.dp_mode != "central":
        raise ConfigError(
            f"client-sampling = 'poisson' is invalid with dp-mode = {privacy.dp_mode}: it samples "
            "clients for central DP's client-level accounting; set dp-mode = central, or "
            "client-sampling = fixed"
        )
    if federation.min_train_clients > 1:
        raise ConfigError(
            f"min-train-clients = {federation.min_train_clients} is invalid with client-sampling = "
            "'poisson': skipping a round with few updates would publish how many clients were "
            "sampled, which the amplification assumes secret; set min-train-clients = 1 (every "
            "round is released)"
        )
    expected = federation.fraction_train * federation.num_clients
    if expected < 1:
        raise ConfigError(
            f"fraction-train = {federation.fraction_train:g} is invalid with client-sampling = "
            f"'poisson' and num-clients = {federation.num_clients}: it samples {expected:.3g} "
            "clients a round on average, and the sum of their updates is divided by that; raise "
            f"it to at least 1/num-clients = {1 / federation.num_clients:.3g}"
        )


def _check_secure_aggregation(
    federation: FederationConfig, privacy: PrivacyConfig, secagg: SecureAggregationConfig
) -> None:
    """SecAgg+ needs two clients to hide one among, and a masked sum that cannot wrap around."""
    if not secagg.secure_aggregation:
        return
    if privacy.dp_mode == "central":
        raise ConfigError(
            "secure-aggregation = true cannot be combined with dp-mode = central: Flower's "
            "central-DP wrappers and SecAgg+ run on different workflows; use dp-mode = local"
        )
    sampled = clients_per_round(federation)
    if sampled < 2:
        raise ConfigError(
            f"secure-aggregation = true is invalid with {sampled} client per round (num-clients = "
            f"{federation.num_clients}, fraction-train = {federation.fraction_train:g}): "
            "a sum over one client is that client's model; sample at least 2"
        )
    levels = secagg.secagg_quantization_range
    if sampled * levels >= SECAGG_MODULUS:
        raise ConfigError(
            f"secagg-quantization-range = {levels} is invalid: the masked sum of {sampled} clients "
            f"would wrap around the 2**32 modulus; must be at most {(SECAGG_MODULUS - 1) // sampled}"
        )


def check_audit(
    audit: AuditConfig,
    federation: FederationConfig,
    data: DataConfig,
    training: TrainingConfig,
    privacy: PrivacyConfig,
    secagg: SecureAggregationConfig,
) -> None:
    """An audit run audits per-example DP-SGD on simulated clients, each holding its own canaries."""
    if not audit.canaries:
        return
    clients = federation.num_clients
    reasons = [
        (privacy.dp_mode == "central", "dp-mode = central (canaries audit the clients' DP-SGD; use dp-mode = local)"),
        (secagg.secure_aggregation, "secure-aggregation = true (the auditor scores each client's own update)"),
        (audit.canaries % clients != 0, f"num-clients = {clients} (each client holds canaries / num-clients of them: use a multiple)"),
        (audit.canaries < 2 * clients, f"num-clients = {clients} (at least 2 canaries per client)"),
    ]
    if audit.canary_kind == MISLABELLED_CANARY:
        reasons += [
            (data.dataset != MNIST, f"dataset = {data.dataset!r} (mislabelled canaries are MNIST test images: use mnist)"),
            (audit.canaries > TEST_SET_SIZE, f"the {TEST_SET_SIZE} MNIST test images (use at most that many)"),
            (training.num_classes < 2, f"num-classes = {training.num_classes} (a wrong label needs two classes)"),
        ]
    for failed, reason in reasons:
        if failed:
            raise ConfigError(f"canaries = {audit.canaries} cannot be combined with {reason}")


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
