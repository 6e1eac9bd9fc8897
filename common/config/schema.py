"""The config classes users fill: a run's (`RunConfig`), a client's share of it, and a node's.

`RunConfig` is what a server runs and saves as `config.toml`; `ClientRunConfig` is the part a
client uses, and all the server sends it, so a client never receives, nor re-checks, the
server's own settings; `NodeConfig` is what a SuperNode's owner sets and no server can.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config.options import FlatConfig, option, section
from common.config.rules import check_audit, check_client, check_run, data_source, total_train_examples
from common.config.sections import (
    POISSON_SAMPLING,
    AuditConfig,
    CentralConfig,
    DataConfig,
    EvaluationConfig,
    FederationConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    TrainingConfig,
    rounds_option,
    seed_option,
)
from common.errors import ConfigError


@dataclass(frozen=True)
class ClientRunConfig(FlatConfig):
    """What a client needs of a run to train and account a round: its data, training and privacy keys."""

    seed: int = seed_option()
    num_server_rounds: int = rounds_option()
    data: DataConfig = section(DataConfig)
    training: TrainingConfig = section(TrainingConfig)
    privacy: PrivacyConfig = section(PrivacyConfig)
    audit: AuditConfig = section(AuditConfig)

    def check(self) -> None:
        check_client(self.data, self.training, self.privacy)


@dataclass(frozen=True)
class RunConfig(FlatConfig):
    """Everything one federated run needs; the resolved form is saved as `config.toml`."""

    name: str = option("mnist-eps2", "run name, used in the run directory's name")
    output_dir: str = option("outputs", "where run directories are created")
    seed: int = seed_option()
    federation: FederationConfig = section(FederationConfig)
    data: DataConfig = section(DataConfig)
    training: TrainingConfig = section(TrainingConfig)
    privacy: PrivacyConfig = section(PrivacyConfig)
    central: CentralConfig = section(CentralConfig)
    evaluation: EvaluationConfig = section(EvaluationConfig)
    secagg: SecureAggregationConfig = section(SecureAggregationConfig)
    audit: AuditConfig = section(AuditConfig)

    def check(self) -> None:
        check_run(
            self.name, self.federation, self.data, self.training, self.privacy, self.central, self.evaluation, self.secagg
        )
        check_audit(self.audit, self.federation, self.data, self.training, self.privacy, self.secagg)

    @property
    def participation_secret(self) -> bool:
        """Whether who trained in a round must stay secret: Poisson client sampling's
        amplification assumes it, so such a run publishes no per-client outcome or count."""
        return self.central.client_sampling == POISSON_SAMPLING

    def for_clients(self) -> ClientRunConfig:
        """The part of this run a client uses: what the server sends it each round."""
        return ClientRunConfig(
            self.seed, self.federation.num_server_rounds, self.data, self.training, self.privacy, self.audit
        )

    def total_train_examples(self) -> int | None:
        """How many training images are split among the clients (held-out validation excluded);
        None for a data set of the user's, whose size only its files know."""
        return total_train_examples(self.data)


@dataclass(frozen=True)
class NodeConfig(FlatConfig):
    """What a client (SuperNode) owns: its shard, its data and its own privacy budget.

    `target-epsilon` / `target-delta` here win over the run config: the server proposes,
    the client decides how much of its data's privacy it is willing to spend.
    """

    partition_id: int = option(0, "which shard of the training set this client holds", low=0)
    num_partitions: int = option(1, "how many shards the training set is cut into", low=1)
    target_epsilon: float | None = option(
        None, "this client's own epsilon budget", low=0.0, low_open=True, allow_inf=True
    )
    target_delta: float | None = option(
        None, "this client's own delta", low=0.0, high=1.0, low_open=True, high_open=True
    )
    dataset: str = option(
        "",
        "this client's own data, used whole: folder:PATH or npz:PATH (or mnist); empty: its "
        "partition (partition-id of num-partitions) of the run's dataset",
    )
    num_classes: int = option(
        0,
        "how many classes this client's data has; declared, the run's num-classes is checked "
        "against it rather than against the data (which a server could probe); 0: not declared",
        low=0,
    )
    data_dir: str = option("", "this client's MNIST directory; empty means $DPFL_DATA_DIR (a simulation's: the run's)")
    ledger_dir: str = option(
        "",
        "directory of this client's privacy ledger, kept across runs; a real client refuses "
        "to train without one",
    )

    def check(self) -> None:
        if self.dataset:
            data_source(self.dataset, "node config dataset")
        if self.partition_id >= self.num_partitions:
            raise ConfigError(
                f"node config partition-id = {self.partition_id} is invalid: must be below "
                f"num-partitions = {self.num_partitions}"
            )
