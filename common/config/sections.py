"""The sections of a run config, one per concern, each a frozen dataclass of `option`s.

Privacy parameters stay apart from training parameters, in the spirit of jax_privacy, and
a client's (`data`, `training`, `privacy`) apart from the server's (`federation`,
`central`, `secagg`): a client is sent, and checks, only its own. The defaults are the
default run (`dpfl simulate` with no preset: 10 IID clients, epsilon = 2 each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.config.options import option

#: Number of images in the MNIST training set; the most samples a run on MNIST can shard.
TRAIN_SET_SIZE = 60_000
#: The models `model` names directly; anything else must be `package.module:factory`.
BUILT_IN_MODELS = ("cnn", "scatnet", "scatnet+fonts")


def seed_option() -> Any:
    """`seed`, in the run config and in what a client is sent of it."""
    return option(0, "fixes partitioning, initialisation and client sampling", low=0)


def rounds_option() -> Any:
    """`num-server-rounds`, in the run config and in what a client is sent of it (it plans its noise over them)."""
    return option(10, "federated rounds", low=1)


@dataclass(frozen=True)
class FederationConfig:
    """How many clients take part and for how long."""

    num_clients: int = option(10, "number of simulated clients (SuperNodes)", low=1)
    num_server_rounds: int = rounds_option()
    fraction_train: float = option(
        1.0, "fraction of clients sampled each round", low=0.0, high=1.0, low_open=True
    )
    min_train_clients: int = option(
        1, "fewest sound updates that make a round; with fewer the round is skipped", low=1
    )
    round_timeout: float = option(
        3600.0,
        "seconds the server waits for a round's replies before going on with those it has",
        low=0.0,
        low_open=True,
    )
    client_num_cpus: float = option(
        1.0,
        "CPUs Ray reserves for each simulated client, so a Ray node with n CPUs trains n / this "
        "clients at once (dpfl's simulation engine; `flwr run` takes client-resources-num-cpus "
        "from its federation config instead)",
        low=0.0,
        low_open=True,
    )


@dataclass(frozen=True)
class DataConfig:
    """The training data and how a simulation cuts it into client shards."""

    dataset: str = option(
        "mnist",
        "training data: mnist, folder:PATH (one sub-directory of images per class) or npz:PATH "
        "(arrays x, y); a simulation cuts it into the clients' shards, a real client's node "
        "config names its own",
    )
    data_dir: str = option(
        "", "directory holding MNIST/raw/*-ubyte; empty means $DPFL_DATA_DIR, else ./data"
    )
    partitioner: str = option(
        "iid", "how shards are drawn", choices=("iid", "dirichlet")
    )
    dirichlet_alpha: float = option(
        0.5, "label-skew concentration for the dirichlet partitioner", low=0.0, low_open=True
    )
    train_subset: int = option(0, "use only this many training images (0 = all)", low=0)
    validation_size: int = option(
        0,
        "training images held out of every shard for tuning (`dpfl tune` evaluates on them); "
        "0 = none",
        low=0,
    )


@dataclass(frozen=True)
class TrainingConfig:
    """Local DP-SGD on each client."""

    model: str = option(
        "scatnet+fonts",
        "cnn (small tanh CNN, 26,010 weights), scatnet (fixed ScatterNet features and a "
        "GroupNorm'd linear head, 39,700 weights), scatnet+fonts (ScatterNet and frozen font-CNN "
        "features, pre-trained on public data, and a linear head, 40,980 weights), or package.module:factory, a function "
        "returning your own nn.Module for (N, 1, 28, 28) inputs",
    )
    num_classes: int = option(10, "classes of the data, labelled 0 to num-classes - 1: the model's outputs", low=2)
    batch_size: int = option(
        1200, "expected batch size (Poisson sampling draws each example with rate B/n)", low=1
    )
    local_epochs: int = option(6, "local epochs per round", low=1)
    learning_rate: float = option(16.0, "SGD learning rate", low=0.0, low_open=True)
    momentum: float = option(0.0, "SGD momentum", low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class PrivacyConfig:
    """Each client's (epsilon, delta) budget, and how its DP-SGD spends and counts it."""

    target_epsilon: float = option(
        2.0,
        "each client's lifetime epsilon; inf trains without privacy (same code path, labelled)",
        low=0.0,
        low_open=True,
        allow_inf=True,
    )
    noise_multiplier: float = option(
        0.0,
        "fixed DP-SGD noise multiplier instead of planning one from target-epsilon (0 = plan); "
        "target-epsilon then only caps what may be spent",
        low=0.0,
    )
    target_delta: float = option(
        1e-5, "each client's delta", low=0.0, high=1.0, low_open=True, high_open=True
    )
    max_grad_norm: float = option(
        0.1, "per-sample gradient clipping norm", low=0.0, low_open=True
    )
    accountant: str = option(
        "prv",
        "Opacus privacy accountant; both are upper bounds (Opacus' gdp is an approximation, "
        "so it may not enforce a budget)",
        choices=("prv", "rdp"),
    )
    ledger_dir: str = option(
        "",
        "simulations only: the privacy ledger of the simulated data set, so spent budget "
        "carries over to later runs on the same records; empty: the run directory's ledgers/. "
        "Real clients ignore it and use their node config's ledger-dir",
    )
    dp_mode: str = option(
        "local",
        "local: each client runs DP-SGD (example-level epsilon; the server need not be "
        "trusted); central: the server clips client updates and noises their average "
        "(client-level epsilon; the server sees the updates and must be trusted)",
        choices=("local", "central"),
    )


#: `client-sampling`: Flower's fixed-size sample, or DP-FedAvg's Poisson sample.
FIXED_SAMPLING, POISSON_SAMPLING = "fixed", "poisson"


@dataclass(frozen=True)
class CentralConfig:
    """Central DP (`dp-mode = central`): the trusted server clips client updates and noises their sum."""

    central_clipping: str = option(
        "server",
        "central DP: where each client's model update is clipped (Flower's server-side or "
        "client-side fixed-clipping wrapper)",
        choices=("server", "client"),
    )
    central_noise_multiplier: float = option(
        1.0,
        "central DP: sigma; the sum of the clipped updates over the planned number of clients "
        "(m, or q * num-clients under poisson) gets noise of std sigma * central-clipping-norm "
        "over that number",
        low=0.0,
    )
    central_clipping_norm: float = option(
        2.0, "central DP: L2 bound on each client's model update per round", low=0.0, low_open=True
    )
    client_sampling: str = option(
        FIXED_SAMPLING,
        "central DP: fixed: m = floor(fraction-train * num-clients) clients a round, drawn from the "
        "seed, each release counted as a Gaussian at sigma (sigma / 2 when m < num-clients), no "
        "amplification; poisson: every client independently with probability q = fraction-train, "
        "drawn from the OS's random source and kept secret (no per-client files, counts or node "
        "ids), each release counted as the subsampled Gaussian at sigma, rate q (DP-FedAvg)",
        choices=(FIXED_SAMPLING, POISSON_SAMPLING),
    )


@dataclass(frozen=True)
class EvaluationConfig:
    """The server's central evaluation of every global model."""

    eval_dataset: str = option(
        "mnist-test",
        "what the server scores each global model on: mnist-test, folder:PATH, npz:PATH, or "
        "none (no central evaluation)",
    )


#: SecAgg+ masks with integers modulo 2**32 (Flower's `modulus_range`); the masked sum of the
#: round's quantised updates must stay below it.
SECAGG_MODULUS = 2**32


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+: the server learns only the weighted sum of the clients' models.

    Fractions, as Flower's `SecAggPlusWorkflow` reads a float, so one setting fits any number
    of clients per round. SecAgg+ quantises the full model parameters after clipping them to
    +-secagg-clipping-range, which must hold the trained model's largest weight.
    """

    secure_aggregation: bool = option(
        False, "aggregate with SecAgg+, so the server sees only the sum of the clients' models"
    )
    secagg_num_shares: float = option(
        1.0,
        "SecAgg+ neighbourhood: fraction of the round's clients each client secret-shares its "
        "keys with (1 = all, classic SecAgg)",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    secagg_reconstruction_threshold: float = option(
        0.67,
        "fraction of a client's shares needed to rebuild its masks; higher is safer against a "
        "colluding server, lower tolerates more clients dropping out",
        low=0.0,
        high=1.0,
        low_open=True,
    )
    secagg_clipping_range: float = option(
        8.0, "model parameters are clipped to +-this before quantisation", low=0.0, low_open=True
    )
    secagg_quantization_range: int = option(
        2**22,
        "integer levels a parameter is quantised to (precision: 2*clipping/this); clients per "
        "round times this must stay below the 2**32 mask modulus",
        low=2,
    )


#: The canary kinds of a one-run audit: a per-example gradient, or a mislabelled test image.
GRADIENT_CANARY, MISLABELLED_CANARY = "gradient", "mislabelled"


@dataclass(frozen=True)
class AuditConfig:
    """Canaries of a one-run privacy audit (`dpfl audit --canaries`); none in any other run.

    A client is sent this section so that a simulated one can insert its canaries, and a
    real one can refuse: it never trains anything but its own data.
    """

    canaries: int = option(
        0,
        "audit runs only (dpfl audit --canaries M): canaries inserted into the simulated "
        "clients' DP-SGD, each with probability 1/2; 0 in every other run",
        low=0,
    )
    canary_kind: str = option(
        GRADIENT_CANARY,
        "gradient: an extra per-example gradient at a random model coordinate, scored from "
        "every update the server receives (white-box); mislabelled: a test image with a wrong "
        "label, scored by the final model's loss (black-box)",
        choices=(GRADIENT_CANARY, MISLABELLED_CANARY),
    )
    canary_seed: int = option(
        0,
        "audit runs only: draws which canaries are in and what they are; dpfl audit picks it at "
        "random for every audit run, so each audit is a fresh trial",
        low=0,
    )
