"""Central (client-level) differential privacy: DP-FedAvg on Flower's fixed-clipping wrappers, accounted by Opacus.

In `dp-mode = central` the server, which must be trusted, releases each round

    global + (sum of the clipped updates) / m + N(0, (sigma * C / m)^2)

where every client's model update is clipped to C = `central-clipping-norm` and m is the
*planned* number of clients, whatever number of sound updates actually came back: the
fixed-denominator estimator of DP-FedAvg (McMahan et al. 2018, "Learning differentially
private recurrent language models"). How clients are sampled (`client-sampling`) sets m
and how each release is counted (`common.privacy.central.ReleaseShape`):

- fixed (Flower's FedAvg sample): m = floor(fraction-train * num-clients) clients drawn
  without replacement from the seeded `random` module. One client moves the release by at
  most C / m when everyone trains, 2C / m when it is sampled in place of another, and no
  amplification by sampling is claimed.
- poisson (`PoissonSampledFedAvg`): every client independently with probability
  q = fraction-train, drawn from the operating system's random source, and m = q *
  num-clients, the expected number. Adding or removing a client moves the sum by at most C,
  so each release is the Poisson-subsampled Gaussian at (sigma, q). That amplification holds
  only if the sample stays secret: this module logs, books and returns nothing that depends
  on who was sampled or replied, and `server.federation` publishes no per-client file,
  client count or node id for such a run.

Fewer replies than sampled (crashes, timeouts, refusals, rejected updates) shrink the
update towards the global model; they cost no extra privacy. The epsilon composes every
central-DP run whose server kept its releases in the same ledger directory
(`common.privacy.central.CentralLedger`): the same clients' data went into all of them.

Flower's `DifferentialPrivacy*SideFixedClipping` wrappers average the m' replies they
receive instead, and one client then moves the release by up to 2C / m' (2C / 3 rather
than C / 3 with three sampled clients), which no accountant calibrated to C / m covers.
So dpfl keeps their round set-up (the client-side wrapper sends clients the clipping norm
for `fixedclipping_mod`), their clipping function and their noise, and replaces their
`aggregate_train`. The server clips every update in both modes: Flower's client-side
wrapper trusts clients to have clipped, but a hostile client can skip its mod, and
clipping an update that is already within C leaves it as it is. Flower's own accountant
is not used: it requires plain `FedAvg.aggregate_train`, and ours screens and refuses
updates first.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from common.config import CentralConfig, FederationConfig, PrivacyConfig
from common.config.sections import POISSON_SAMPLING
from common.privacy.central import CentralLedger, ClientLevelAccountant, Releases, release_shape
from common.protocol import ARRAYS_KEY, REFUSAL_KEY
from server.strategy import UNIFORM_WEIGHT, BudgetExhausted, LedgerAwareFedAvg, reply_problem

log = logging.getLogger(__name__)


class PoissonSampledFedAvg(LedgerAwareFedAvg):
    """Uniform FedAvg whose train round goes to every client independently with probability fraction-train.

    The round waits, as Flower's FedAvg does, until `min_available_nodes` (num-clients) are
    connected; the messages are FedAvg's (the arrays, and the config with `server-round`),
    sent to the nodes drawn. The draw comes from the operating system's random source
    (`random.SystemRandom`), not the config's seed: `config.toml` is saved with the run, and
    the amplification by sampling assumes nobody can tell who was sampled. Unlike FedAvg's,
    this `configure_train` logs nothing about the sample and books no node as instructed:
    a Poisson round keeps no per-client outcomes (`client_rows` is empty). `rng` is for tests.
    """

    def __init__(self, rng: random.Random | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rng = rng if rng is not None else random.SystemRandom()
        self.drawn: set[int] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)  # Flower's wait for the clients; draws none
        self.begin_round(arrays, set(nodes))
        drawn = [node for node in nodes if self.rng.random() < self.fraction_train]
        self.drawn = set(drawn)  # kept in memory only: which replies may count
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, drawn, MessageType.TRAIN)


class _DPFedAvg:
    """What both of Flower's wrappers get from dpfl: screening, the fixed-denominator release, accounting.

    Unsound and failed replies are dropped before anything is clipped (clipping subtracts
    tensors whose shapes must match). A round whose release would push the client-level
    epsilon past `target-epsilon` is not started. `num_sampled_clients` is the release's
    fixed denominator: m, or q * num-clients under Poisson sampling.
    """

    strategy: LedgerAwareFedAvg
    privacy: ClientLevelAccountant
    target_epsilon: float
    clipping_norm: float
    num_sampled_clients: float

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        after = self.privacy.epsilon_after_next_release()
        if after > self.target_epsilon:
            raise BudgetExhausted(
                f"the central privacy budget is spent: client-level epsilon "
                f"{self.privacy.epsilon:.3f} of {self.target_epsilon:g}, and round "
                f"{server_round} would reach {after:.3f}"
            )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """global + (sum of the clipped updates) / m + noise.

        Under fixed sampling the strategy books the replies and decides about refusals and
        skipped rounds. Under Poisson sampling every round is released and nothing else is
        returned: no metrics (their number of examples would count the clients), no
        refusal ending the run, no skipped round.
        """
        if isinstance(self.strategy, PoissonSampledFedAvg):
            return self._release(self._secret_updates(replies)), None
        screened = [
            reply
            for reply in self.strategy.screen(server_round, replies)
            if not self._left_out(server_round, reply)
        ]
        mean, metrics = self.strategy.aggregate_train(server_round, screened)  # uniform, over m'
        if mean is None:
            return None, metrics
        trained = [reply for reply in screened if REFUSAL_KEY not in reply.content]
        if len(trained) > self.num_sampled_clients:  # privacy holds (C / m each); the step grows
            log.warning(
                "round %d: %d updates for %d planned clients: their sum over %d exceeds their mean",
                server_round,
                len(trained),
                self.num_sampled_clients,
                self.num_sampled_clients,
            )
        return self._release(trained), metrics

    def _release(self, updates: Iterable[Message]) -> ArrayRecord:
        """Count and return global + (sum of the clipped `updates`) / m + noise of std sigma * C / m.

        Each update is taken in float64, clipped with Flower's clipping and added to a running
        sum as it comes (the order of thousands of additions must not matter), then let go. An
        update whose norm is zero or not finite (only a hostile client's: a changed model has
        a positive finite norm in float64) is left out: Flower's clipping would divide by zero
        or turn the whole release into NaN. Either way it adds nothing, as a left-out client does.
        """
        original = self.strategy.global_arrays.to_numpy_ndarrays()
        reference = [array.astype(np.float64) for array in original]
        total = [np.zeros(array.shape) for array in reference]
        for reply in updates:
            trained = reply.content[ARRAYS_KEY].to_numpy_ndarrays()
            update = [after.astype(np.float64) - before for after, before in zip(trained, reference, strict=True)]
            if not 0 < get_norm(update) < np.inf:
                continue
            clip_inputs_inplace(update, self.clipping_norm)  # Flower's, in both clipping modes
            for part, clipped in zip(total, update, strict=True):
                part += clipped
        summed = ArrayRecord(
            {
                name: Array(np.asarray(before + part / self.num_sampled_clients, dtype=kept.dtype))
                for name, kept, before, part in zip(
                    self.strategy.global_arrays.keys(), original, reference, total, strict=True
                )
            }
        )
        released = self._add_noise_to_aggregated_arrays(summed)  # std sigma * C / m, Flower's
        self.privacy.record_release()
        return released

    def _secret_updates(self, replies: Iterable[Message]) -> Iterator[Message]:
        """The sound trained updates among a Poisson round's replies, picked out without a word.

        Only the first reply of each node drawn this round counts. Failed, unsound and
        refused replies and unchanged models are left out as under fixed
        sampling, but neither logged nor counted: who replied, and how, would tell who was
        sampled.
        """
        reference = self.strategy.global_arrays
        expected = set(self.strategy.drawn)  # each drawn node once: no stray or second reply counts
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in expected:
                continue
            expected.discard(node)
            if (
                not reply.has_error()
                and reply_problem(reply.content, reference) is None
                and REFUSAL_KEY not in reply.content
                and not self._unchanged(reply)
            ):
                yield reply

    def _unchanged(self, reply: Message) -> bool:
        """A reply holding the global model as it was: Flower's clipping divides by its zero norm.

        Leaving it out changes no release (its update is zero, and the sum is divided by m
        whatever the number of replies); it only no longer counts as a client that trained.
        """
        arrays = reply.content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            return False
        reference = self.strategy.global_arrays
        return not any(np.any(array.numpy() != reference[name].numpy()) for name, array in arrays.items())

    def _left_out(self, server_round: int, reply: Message) -> bool:
        """`_unchanged`, logged: under fixed sampling who replied is no secret."""
        if not self._unchanged(reply):
            return False
        log.warning(
            "round %d: left out node %d's update: it is the global model unchanged",
            server_round,
            reply.metadata.src_node_id,
        )
        return True


class ServerSideClipping(_DPFedAvg, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, screened, released as DP-FedAvg and accounted."""


class ClientSideClipping(_DPFedAvg, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (clients clip with `fixedclipping_mod`; the server clips again)."""


def central_dp(
    strategy: LedgerAwareFedAvg,
    privacy: PrivacyConfig,
    central: CentralConfig,
    federation: FederationConfig,
    history: Releases | None = None,
    shared: CentralLedger | None = None,
) -> tuple[Strategy, ClientLevelAccountant]:
    """Wrap `strategy` (which must aggregate uniformly, and be a `PoissonSampledFedAvg` exactly
    when client-sampling = poisson) for central DP over `federation`'s clients; `history` is
    a resumed run's releases, `shared` composes other runs' releases on the same clients."""
    if strategy.weighted_by_key != UNIFORM_WEIGHT:
        raise ValueError("central DP needs a strategy that aggregates uniformly (uniform_weights=True)")
    if isinstance(strategy, PoissonSampledFedAvg) != (central.client_sampling == POISSON_SAMPLING):
        raise ValueError("client-sampling = poisson needs a PoissonSampledFedAvg, and only it samples so")
    shape = release_shape(federation, central)
    if isinstance(strategy, PoissonSampledFedAvg) and strategy.fraction_train != shape.sample_rate:
        raise ValueError("the strategy draws clients at another rate than the accountant counts")
    sigma = central.central_noise_multiplier
    wrapper = ServerSideClipping if central.central_clipping == "server" else ClientSideClipping
    wrapped = wrapper(strategy, sigma, central.central_clipping_norm, shape.denominator)
    wrapped.privacy = ClientLevelAccountant(
        shape.accounted_noise(sigma), privacy.target_delta, privacy.accountant, history, shared, shape.sample_rate
    )
    wrapped.target_epsilon = privacy.target_epsilon
    return wrapped, wrapped.privacy
