"""Central (client-level) differential privacy: DP-FedAvg on Flower's fixed-clipping wrappers, accounted by Opacus.

In `dp-mode = central` the server, which must be trusted, releases each round

    global + (sum of the clipped updates) / m + N(0, (sigma * C / m)^2)

where every client's model update is clipped to C = `central-clipping-norm` and m is the
*planned* number of sampled clients, whatever number m' of sound updates actually came
back: the fixed-denominator estimator of DP-FedAvg (McMahan et al. 2018, "Learning
differentially private recurrent language models"). Adding or removing one client then
moves the release by at most C / m, so each release is a Gaussian mechanism with noise
multiplier sigma over whole clients, and the run's client-level epsilon is the
composition of those releases, counted with the Opacus accountant the config names.
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
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_clip_model_update

from common.config import CentralConfig, PrivacyConfig
from common.privacy.central import CentralLedger, ClientLevelAccountant, Releases
from common.protocol import ARRAYS_KEY
from server.strategy import UNIFORM_WEIGHT, BudgetExhausted, LedgerAwareFedAvg

log = logging.getLogger(__name__)

class _DPFedAvg:
    """What both of Flower's wrappers get from dpfl: screening, the fixed-denominator release, accounting.

    Unsound and failed replies are dropped before anything is clipped (clipping subtracts
    tensors whose shapes must match). A round whose release would push the client-level
    epsilon past `target-epsilon` is not started.
    """

    strategy: LedgerAwareFedAvg
    privacy: ClientLevelAccountant
    target_epsilon: float
    clipping_norm: float
    num_sampled_clients: int

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
        """global + (sum of the clipped updates) / m + noise; refusals and skipped rounds as the strategy decides."""
        screened = [
            reply
            for reply in self.strategy.screen(server_round, replies)
            if not self._unchanged(server_round, reply)
        ]
        reference = self.strategy.global_arrays.to_numpy_ndarrays()
        for reply in screened:
            self._clip(reply, reference)
        mean, metrics = self.strategy.aggregate_train(server_round, screened)  # uniform, over m'
        if mean is None:
            return None, metrics
        aggregated = self.strategy.last_round.clients_trained
        if aggregated > self.num_sampled_clients:  # privacy holds (C / m each); the step grows
            log.warning(
                "round %d: %d updates for %d planned clients: their sum over %d exceeds their mean",
                server_round,
                aggregated,
                self.num_sampled_clients,
                self.num_sampled_clients,
            )
        # The mean of m' clipped models, moved from the global model by m'/m, is the global
        # model plus the sum of the m' clipped updates over m.
        scale = aggregated / self.num_sampled_clients
        summed = ArrayRecord(
            {
                name: Array(np.asarray(before + scale * (after - before)))
                for name, before, after in zip(mean.keys(), reference, mean.to_numpy_ndarrays(), strict=True)
            }
        )
        released = self._add_noise_to_aggregated_arrays(summed)  # std sigma * C / m, Flower's
        self.privacy.record_release()
        return released, metrics

    def _clip(self, reply: Message, reference: list[np.ndarray]) -> None:
        """Clip a trained reply's update to C in place, with Flower's clipping, in both modes."""
        arrays = reply.content.array_records.get(ARRAYS_KEY)
        if arrays is None:  # a refusal: nothing to clip
            return
        ndarrays = arrays.to_numpy_ndarrays()
        compute_clip_model_update(param1=ndarrays, param2=reference, clipping_norm=self.clipping_norm)
        reply.content[ARRAYS_KEY] = ArrayRecord(
            {name: Array(np.asarray(value)) for name, value in zip(arrays.keys(), ndarrays, strict=True)}
        )

    def _unchanged(self, server_round: int, reply: Message) -> bool:
        """A reply holding the global model as it was: Flower's clipping divides by its zero norm.

        Leaving it out changes no release (its update is zero, and the sum is divided by m
        whatever the number of replies); it only no longer counts as a client that trained.
        """
        arrays = reply.content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            return False
        reference = self.strategy.global_arrays
        if any(np.any(array.numpy() != reference[name].numpy()) for name, array in arrays.items()):
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
    sampled: int,
    history: Releases | None = None,
    num_clients: int | None = None,
    shared: CentralLedger | None = None,
) -> tuple[Strategy, ClientLevelAccountant]:
    """Wrap `strategy` (which must aggregate uniformly) for central DP over `sampled` planned
    clients a round, out of `num_clients` (by default the same: everyone, every round);
    `shared` composes other runs' releases on the same clients into the epsilon."""
    if strategy.weighted_by_key != UNIFORM_WEIGHT:
        raise ValueError("central DP needs a strategy that aggregates uniformly (uniform_weights=True)")
    wrapper = ServerSideClipping if central.central_clipping == "server" else ClientSideClipping
    wrapped = wrapper(strategy, central.central_noise_multiplier, central.central_clipping_norm, sampled)
    subsampled = num_clients is not None and num_clients > sampled
    sigma = central.central_noise_multiplier / (2 if subsampled else 1)
    wrapped.privacy = ClientLevelAccountant(sigma, privacy.target_delta, privacy.accountant, history, shared)
    wrapped.target_epsilon = privacy.target_epsilon
    return wrapped, wrapped.privacy
