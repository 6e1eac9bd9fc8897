"""The indexed LinkState hands out exactly what Flower's own does, in the same order."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory, linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from simulations.linkstate import IndexedLinkState, indexed_link_state

RUN_ID, TASK_ID, NODES = 11, 12, 5


def _federation(monkeypatch: pytest.MonkeyPatch) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    """A state with NODES registered nodes and a run, as Flower's simulation sets them up."""
    # Who is pushing: the properties that read these raise until Flower's simulation sets them.
    monkeypatch.setattr(TaskIdentity, "_task_id", TASK_ID)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the SuperLink's
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    nodes = list(_register_nodes(NODES, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def _instruction(node: int, tag: int, ttl: float | None = None) -> Message:
    content = RecordDict({"arrays": ArrayRecord([np.full(3, tag, dtype=np.float32)])})
    return Message(content, dst_node_id=node, message_type="train", ttl=ttl)


def _tag(message: Message) -> int:
    return int(message.content["arrays"].to_numpy_ndarrays()[0][0])


def _script(monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[list[int]]]:
    """Push instructions (two for some nodes, one that expires), then ask every node twice, as the runtime does."""
    state, grid, nodes = _federation(monkeypatch)
    grid.push_messages([_instruction(node, 10 * i) for i, node in enumerate(nodes)])
    grid.push_messages([_instruction(nodes[0], 1), _instruction(nodes[2], 21)])
    grid.push_messages([_instruction(nodes[3], 31, ttl=0.05)])
    time.sleep(0.1)
    asked = []
    for _ in range(3):
        for node in nodes:
            asked.append([_tag(m) for m in state.get_message_ins(node_id=node, limit=1)])
    asked.append([_tag(m) for m in state.get_message_ins(node_id=nodes[2], limit=None)])
    return type(state).__name__, asked


def test_indexed_state_answers_as_flowers_does(monkeypatch: pytest.MonkeyPatch) -> None:
    flowers_class, flowers = _script(monkeypatch)
    with indexed_link_state():
        ours_class, ours = _script(monkeypatch)
    assert (flowers_class, ours_class) == ("InMemoryLinkState", "IndexedLinkState")
    assert ours == flowers
    # Oldest first, one per ask, never twice; the expired instruction never delivered.
    assert ours[:5] == [[0], [10], [20], [30], [40]]
    assert ours[5:10] == [[1], [], [21], [], []]
    assert all(asked == [] for asked in ours[10:])


def test_the_swap_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError), indexed_link_state():
        assert linkstate_factory.InMemoryLinkState is IndexedLinkState
        raise RuntimeError("a failed simulation")
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState


def test_other_runs_instructions_wait_for_their_run(monkeypatch: pytest.MonkeyPatch) -> None:
    with indexed_link_state():
        state, grid, nodes = _federation(monkeypatch)
    grid.push_messages([_instruction(nodes[1], 5)])
    assert state.get_message_ins(node_id=nodes[1], limit=1, run_id=RUN_ID + 1) == []
    assert [_tag(m) for m in state.get_message_ins(node_id=nodes[1], limit=1, run_id=RUN_ID)] == [5]
