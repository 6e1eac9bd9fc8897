"""Flower's in-memory LinkState with each node's undelivered instructions indexed, for simulations of thousands of clients.

Flower's simulation runtime asks the LinkState for every virtual SuperNode's next
instruction, node by node, ten times a second (`vce_api.add_messages_to_queue`), and
`InMemoryLinkState.get_message_ins` answers each call by scanning every stored instruction.
A sweep therefore costs nodes x instructions, all of it under the state's lock and Python's
GIL, which the ServerApp thread and the threads feeding Ray's actors wait on: measured on
this machine, one sweep with nothing left to deliver took 0.6 s at 500 clients, 2.5 s at
1,000 and 9.3 s at 2,000, and would take minutes at 10,000.

`IndexedLinkState` keeps a queue of undelivered instruction ids per node and answers from
it. Everything else is Flower's: the same storage, the same checks on each candidate
(`_check_stored_messages`: expiry and federation), the same delivery mark, the same order.
`indexed_link_state` puts it in place of Flower's class for the simulations this process
runs, and only while they run.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.server.superlink.linkstate import linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

_swap = threading.Lock()


class IndexedLinkState(InMemoryLinkState):
    """`InMemoryLinkState` whose `get_message_ins` looks only at the asking node's instructions."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._undelivered: dict[int, deque[str]] = {}

    def store_message_ins(self, message: Message) -> str | None:
        message_id = super().store_message_ins(message)
        if message_id is not None:
            with self.lock:
                self._undelivered.setdefault(message.metadata.dst_node_id, deque()).append(str(message_id))
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
        """Flower's answer (the node's undelivered instructions, oldest first, at most `limit`), without the scan."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with self.lock:
            queue = self._undelivered.get(node_id)
            other_runs: list[str] = []
            while queue and not (limit and len(found) == limit):
                message_id = queue.popleft()
                self._check_stored_messages({message_id})  # drops it if expired, as Flower's scan does
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    continue  # gone (expired, deleted) or handed out already: never again
                if run_id is not None and message.metadata.run_id != run_id:
                    other_runs.append(message_id)  # another run's: it stays for that run's asks
                    continue
                found.append(message)
            if queue is not None:
                queue.extendleft(reversed(other_runs))
                if not queue:
                    del self._undelivered[node_id]
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
        return found


@contextmanager
def indexed_link_state() -> Iterator[None]:
    """Flower's simulations started inside this block keep their instructions in an `IndexedLinkState`.

    Flower's `LinkStateFactory` builds its in-memory state from the class its module names,
    and `run_simulation` offers no way to pass another; the name is swapped for the block and
    restored after it. Simulations run one at a time in a process, so no other run sees it.
    """
    with _swap:
        original = linkstate_factory.InMemoryLinkState
        linkstate_factory.InMemoryLinkState = IndexedLinkState
        try:
            yield
        finally:
            linkstate_factory.InMemoryLinkState = original
