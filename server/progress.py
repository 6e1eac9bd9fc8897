"""The server's Grid while a round waits: replies handed to the strategy as they arrive, and a
progress bar of them (of how many clients replied, or, where that number is secret, only that
the round waits)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from tqdm import tqdm

#: How often Flower's HTTP grid (a real SuperLink's) pulls replies; its in-memory grid says its own.
HTTP_PULL_SECONDS = 3.0


class ReplyProgress(Grid):
    """The server's Grid, streaming the replies to the strategy, with a bar of them.

    Strategies wait in `send_and_receive`; this one pushes at once and pulls as Flower's
    grids do (the same timeout, the same replies, at the wrapped grid's pace), but returns
    an iterator that hands each reply out as soon as it is pulled, so a strategy that sums
    them one at a time (`server.strategy.LedgerAwareFedAvg`) never holds a round's replies
    all at once: Flower's grids return a list, and thousands of clients' models in it would
    make the server's memory grow with the number of clients. `stream=False` returns that
    list instead (Flower's legacy SecAgg+ workflow reads its replies more than once).
    `describe` names the bar (the round in flight). The bar is drawn on `file` (stderr)
    only when that is a terminal, and is gone once the last reply is handed out, so the
    round's log line comes after it. Everything else is the wrapped grid's.

    Without `count_replies` (Poisson client sampling, where how many clients were sent the
    round is secret) the bar shows only that the round is waiting, and for how long.
    """

    def __init__(
        self,
        grid: Grid,
        describe: Callable[[], str],
        file: TextIO | None = None,
        count_replies: bool = True,
        stream: bool = True,
    ) -> None:
        self._grid = grid
        self._describe = describe
        self._file = file
        self._count_replies = count_replies
        self._stream = stream

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        if not pending:  # as Flower's grids answer: an empty list, which strategies skip without a word
            return []
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies = self._replies(pending, None if timeout is None else end)
        return replies if self._stream else list(replies)

    def _replies(self, pending: set[str], end: float | None) -> Iterator[Message]:
        """The replies to `pending`, each as soon as it is pulled, until all came or `end` passed."""
        pause = getattr(self._grid, "pull_interval", HTTP_PULL_SECONDS)
        counted = "{bar} {n_fmt}/{total_fmt} clients replied" if self._count_replies else "waiting for the clients"
        with tqdm(
            total=len(pending) if self._count_replies else None,
            desc=self._describe(),
            bar_format="{desc}: " + counted + " [{elapsed}]",
            leave=False,
            disable=None,
            file=self._file,
        ) as bar:
            while end is None or time.time() < end:
                fresh = []
                for reply in self._grid.pull_messages(pending):
                    if reply.metadata.reply_to_message_id in pending:  # one reply per instruction, no strays
                        pending.discard(reply.metadata.reply_to_message_id)
                        fresh.append(reply)
                if self._count_replies:
                    bar.update(len(fresh))
                yield from fresh
                if not pending:
                    break
                time.sleep(pause)
