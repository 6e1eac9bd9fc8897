"""Central (client-level) differential privacy: Flower's fixed-clipping wrappers, accounted by Opacus.

In `dp-mode = central` the server, which must be trusted, clips every client's model
update to `central-clipping-norm` (on the server, or on the client with Flower's
`fixedclipping_mod`), averages the m sampled clients' updates uniformly and adds Gaussian
noise of std sigma * C / m (Flower's `DifferentialPrivacy*SideFixedClipping`). Each
released global model is then a Gaussian mechanism over whole clients, and the run's
client-level epsilon is the composition of those releases, counted here with the Opacus
accountant the config names. Flower's own accountant is not used: it requires plain
`FedAvg.aggregate_train`, and ours screens and refuses updates first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from opacus.accountants import create_accountant

from common.config import PrivacyConfig
from common.privacy import accountant_epsilon
from common.protocol import ARRAYS_KEY
from server.strategy import BudgetExhausted, LedgerAwareFedAvg

log = logging.getLogger(__name__)

#: One (noise multiplier, sampling rate, releases) entry per run of equal releases.
History = list[tuple[float, float, int]]


class ClientLevelAccountant:
    """The client-level epsilon of the global models a central-DP server has released.

    A release averages m' <= m clipped updates (norm <= C) uniformly and adds noise of std
    sigma * C / m. Removing one client moves the average by at most C / m', so the release
    is a Gaussian mechanism with noise multiplier sigma * m' / m: fewer replies than sampled
    (crashes, timeouts, rejections) cost more, and are counted so. Subsampling
    amplification is not claimed (sampling rate 1): Flower samples a fixed number of
    clients without replacement, which Opacus' Poisson-sampling accountants do not model.
    """

    def __init__(self, privacy: PrivacyConfig, sampled: int, history: History | None = None) -> None:
        self.noise_multiplier = privacy.central_noise_multiplier
        self.sampled = sampled
        self.delta = privacy.target_delta
        self.accountant = create_accountant(privacy.accountant)
        self.accountant.history = list(history or [])

    @property
    def history(self) -> History:
        return list(self.accountant.history)

    def record_release(self, aggregated: int) -> None:
        """Count one released global model that averaged `aggregated` client updates."""
        self.accountant.step(
            noise_multiplier=self.noise_multiplier * aggregated / self.sampled, sample_rate=1.0
        )

    @property
    def epsilon(self) -> float:
        return accountant_epsilon(self.accountant, self.delta)

    def epsilon_after_full_release(self) -> float:
        """The epsilon once one more release over all m sampled clients is made."""
        preview = create_accountant(self.accountant.mechanism())
        preview.history = self.history
        preview.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        return accountant_epsilon(preview, self.delta)


class _ScreenAndAccount:
    """What both of Flower's wrappers need from dpfl: screened replies in, accounting out.

    Unsound and failed replies are dropped before Flower's wrapper sees them (it would
    skip a whole round for one failed client, and clipping subtracts tensors whose shapes
    must match). A round whose next release would push the client-level epsilon past
    `target-epsilon` is not started.
    """

    strategy: LedgerAwareFedAvg
    privacy: ClientLevelAccountant
    target_epsilon: float

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        after = self.privacy.epsilon_after_full_release()
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
        screened = [
            reply
            for reply in self.strategy.screen(server_round, replies)
            if not self._unchanged(server_round, reply)
        ]
        arrays, metrics = super().aggregate_train(server_round, screened)
        if arrays is not None:
            self.privacy.record_release(self.strategy.last_round.clients_trained)
        return arrays, metrics


    def _unchanged(self, server_round: int, reply: Message) -> bool:
        """A reply holding the global model as it was: Flower's clipping divides by its zero norm.

        Leaving it out cannot understate the privacy cost: the release is accounted with the
        number of updates that were actually averaged.
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


class ServerSideClipping(_ScreenAndAccount, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, screened and accounted."""


class ClientSideClipping(_ScreenAndAccount, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (clients clip with `fixedclipping_mod`), screened and accounted."""


def central_dp(
    strategy: LedgerAwareFedAvg, privacy: PrivacyConfig, sampled: int, history: History | None = None
) -> tuple[Strategy, ClientLevelAccountant]:
    """Wrap `strategy` (which must aggregate uniformly) in the configured Flower DP wrapper."""
    wrapper = ServerSideClipping if privacy.central_clipping == "server" else ClientSideClipping
    wrapped = wrapper(
        strategy, privacy.central_noise_multiplier, privacy.central_clipping_norm, sampled
    )
    wrapped.privacy = ClientLevelAccountant(privacy, sampled, history)
    wrapped.target_epsilon = privacy.target_epsilon
    return wrapped, wrapped.privacy
