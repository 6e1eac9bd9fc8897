"""The canaries of a one-run privacy audit: which exist, who holds them, and which are in.

Client and auditor derive them from the run config alone. A simulated client inserts the
canaries it holds that are "in" (each is, independently, with probability 1/2); the auditor
scores every canary without looking at membership, and only then counts its right guesses
(`common.privacy.one_run`). Membership comes from its own random stream, apart from the
canaries' content, and the training's randomness (sampling, noise) comes from the operating
system, so membership is independent of everything but the canaries' effect on training.

- Gradient canaries (white-box): an extra per-example gradient C * e_k at a coordinate k of
  the trained parameters, distinct within a client. A client's canaries are keyed by its
  node id, which the server also sees on every reply: the auditor scores each canary on
  its holder's updates alone, without clients sending anything new.
- Mislabelled canaries (black-box): MNIST test images with a wrong label, shared out by
  partition id; the auditor scores them on the final model only, so it needs no holder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config.sections import AuditConfig
from common.errors import ConfigError

#: Stream tags: what a canary is and whether it is in come from unrelated random streams.
_CONTENT, _MEMBERSHIP = 1, 2


def refuse_unaudited(canaries: object) -> None:
    """Canaries belong in a run someone audits: elsewhere they only perturb training, unlabelled."""
    if canaries not in (0, "0", None):
        raise ConfigError(
            f"canaries = {canaries} makes an audit run; run it with `dpfl audit --canaries "
            f"{canaries}`, which inserts and scores them, or set canaries = 0"
        )


def _stream(seed: int, audit: AuditConfig, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, audit.canary_seed, *words])


@dataclass(frozen=True)
class GradientCanaries:
    """One client's gradient canaries: flat coordinates into its trained parameters, and membership."""

    coordinates: np.ndarray
    included: np.ndarray


def gradient_canaries(audit: AuditConfig, seed: int, node_id: int, num_clients: int, size: int) -> GradientCanaries:
    """The gradient canaries the client with `node_id` holds, among `size` trained coordinates."""
    count = audit.canaries // num_clients
    if count > size:
        raise ValueError(f"{count} gradient canaries per client need as many coordinates; the model trains {size}")
    coordinates = _stream(seed, audit, _CONTENT, node_id).choice(size, size=count, replace=False)
    included = _stream(seed, audit, _MEMBERSHIP, node_id).random(count) < 0.5
    return GradientCanaries(coordinates, included)


@dataclass(frozen=True)
class MislabelledCanaries:
    """Every mislabelled canary: its test image, wrong label, holder (partition id) and membership."""

    images: np.ndarray
    labels: np.ndarray
    holders: np.ndarray
    included: np.ndarray

    def held_by(self, partition_id: int) -> np.ndarray:
        """Indices of the canaries this partition trains on: those it holds that are in."""
        return np.flatnonzero((self.holders == partition_id) & self.included)


def mislabelled_canaries(
    audit: AuditConfig, seed: int, num_clients: int, true_labels: np.ndarray, num_classes: int
) -> MislabelledCanaries:
    """Test images (by index into `true_labels`, the test set's labels) with a label that is wrong."""
    content = _stream(seed, audit, _CONTENT)
    images = content.choice(len(true_labels), size=audit.canaries, replace=False)
    shift = content.integers(1, num_classes, size=audit.canaries)  # never 0: always a wrong label
    labels = (np.asarray(true_labels)[images] + shift) % num_classes
    holders = np.arange(audit.canaries) % num_clients
    included = _stream(seed, audit, _MEMBERSHIP).random(audit.canaries) < 0.5
    return MislabelledCanaries(images, labels, holders, included)
