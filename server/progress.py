"""A progress bar for the round in flight: how many of the clients sent an instruction have replied."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TextIO

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from tqdm import tqdm

#: How often Flower's HTTP grid (a real SuperLink's) pulls replies; its in-memory grid says its own.
HTTP_PULL_SECONDS = 3.0


class ReplyProgress(Grid):
    """The server's Grid, with a bar of the replies while a strategy waits for them.

    Strategies wait in `send_and_receive`; this one pushes and pulls as Flower's grids do
    (the same timeout, the same replies, at the wrapped grid's pace), counting the replies
    as they come. `describe` names the bar (the round in flight). The bar is drawn on `file`
    (stderr) only when that is a terminal, and is gone before `send_and_receive` returns,
    so the round's log line comes after it. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, describe: Callable[[], str], file: TextIO | None = None) -> None:
        self._grid = grid
        self._describe = describe
        self._file = file

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
        if not pending:
            return []
        pause = getattr(self._grid, "pull_interval", HTTP_PULL_SECONDS)
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        with tqdm(
            total=len(pending),
            desc=self._describe(),
            bar_format="{desc}: {bar} {n_fmt}/{total_fmt} clients replied [{elapsed}]",
            leave=False,
            disable=None,
            file=self._file,
        ) as bar:
            while timeout is None or time.time() < end:
                pulled = list(self._grid.pull_messages(pending))
                replies.extend(pulled)
                answered = {reply.metadata.reply_to_message_id for reply in pulled} & pending
                pending -= answered
                bar.update(len(answered))
                if not pending:
                    break
                time.sleep(pause)
        return replies
