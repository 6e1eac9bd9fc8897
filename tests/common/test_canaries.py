"""Canaries of a one-run audit: derived from the config alone, distinct, and in with probability 1/2."""

import numpy as np

from common.canaries import gradient_canaries, mislabelled_canaries
from common.config.sections import AuditConfig

AUDIT = AuditConfig(canaries=1000)


def test_gradient_canaries_are_a_function_of_seed_and_node():
    first = gradient_canaries(AUDIT, 0, 12345, 10, 39_700)
    again = gradient_canaries(AUDIT, 0, 12345, 10, 39_700)
    other = gradient_canaries(AUDIT, 0, 67890, 10, 39_700)
    assert np.array_equal(first.coordinates, again.coordinates) and np.array_equal(first.included, again.included)
    assert len(first.coordinates) == 100 and len(set(first.coordinates.tolist())) == 100  # distinct within a client
    assert not np.array_equal(first.coordinates, other.coordinates)
    assert first.coordinates.max() < 39_700


def test_node_ids_as_large_as_flowers_work():
    canaries = gradient_canaries(AUDIT, 3, 2**63 + 17, 10, 1000)
    assert len(canaries.coordinates) == 100


def test_membership_is_about_half_and_apart_from_content():
    included = np.concatenate([gradient_canaries(AUDIT, 0, node, 10, 39_700).included for node in range(50)])
    assert 0.45 < included.mean() < 0.55
    # The same content with another seed's stream would give other coordinates; membership must
    # not follow coordinates: their correlation over 5,000 canaries is near zero.
    coordinates = np.concatenate([gradient_canaries(AUDIT, 0, node, 10, 39_700).coordinates for node in range(50)])
    assert abs(np.corrcoef(coordinates, included)[0, 1]) < 0.05


def test_mislabelled_canaries_have_wrong_labels_and_one_holder_each():
    true_labels = np.random.default_rng(0).integers(0, 10, size=10_000)
    canaries = mislabelled_canaries(AuditConfig(canaries=500, canary_kind="mislabelled"), 0, 5, true_labels, 10)
    assert len(set(canaries.images.tolist())) == 500
    assert np.all(canaries.labels != true_labels[canaries.images])
    assert np.all((0 <= canaries.labels) & (canaries.labels < 10))
    assert np.bincount(canaries.holders).tolist() == [100] * 5
    held = [canaries.held_by(partition) for partition in range(5)]
    assert sum(len(h) for h in held) == canaries.included.sum()
    assert all(np.all(canaries.holders[h] == partition) for partition, h in enumerate(held))
