"""One-run canary audit of DP-SGD (Steinke, Nasr and Jagielski, 2023): the auditor's side.

An audit run is a simulation whose clients train canaries besides their data, each canary
in with probability 1/2 (`common.canaries`). The auditor scores every canary without
knowing which are in, guesses, and turns its right guesses into an epsilon lower bound
(`common.privacy.one_run`). If the clients' DP-SGD gives the epsilon their accountant
reports, the bound stays at or below it with 95 % confidence, whatever the scores; a bound
above it proves that the training, or its accounting, is not as private as reported.

- White-box (gradient canaries): the server is the adversary and sees every update a client
  releases. `UpdateObserver` wraps the federation's Grid and, for each reply, adds the
  update's step against each of that client's canary coordinates (minus the change of the
  coordinate: gradient descent moves against a gradient) to the canary's score.
- Black-box (mislabelled canaries): only the final model is seen; a canary's score is minus
  the model's loss on its image and wrong label.

Both neighbouring relations are add/remove (a canary in or out), the one Opacus' accountants
bound, so the lower bound is compared with the accountant's epsilon directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid
from torch.utils.data import TensorDataset

from common.canaries import GradientCanaries, gradient_canaries, mislabelled_canaries
from common.config import RunConfig
from common.config.rules import MNIST_TEST
from common.data import load_dataset
from common.model import build_model, trainable_keys
from common.privacy.one_run import OneRunBound, largest_certifiable, lower_bound
from common.protocol import ARRAYS_KEY
from common.storage import atomic_write
from server.audit import AUDIT_FILE, CONFIDENCE, per_example_losses


class UpdateObserver:
    """A Grid that passes everything through and keeps each train reply's step at the canaries' coordinates.

    It sees what the server sees: the model each client was sent and the model it sent back.
    A reply without weights (a refusal, a failure) adds nothing. A canary's score
    (`scored`) is its holder's steps against its coordinate, minus the mean step of the
    round's other clients there: their real data pulls that coordinate as the holder's
    does, canary or not, and subtracting it leaves mostly the canary's own pull and the noise.
    Scores are a function of the released updates only, as the one-run bound requires.
    """

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self._grid = grid
        self._config = config
        model = build_model(config.training.model, num_classes=config.training.num_classes)
        self._keys = trainable_keys(model)
        self._size = sum(model.state_dict()[key].numel() for key in self._keys)
        self._canaries: dict[int, GradientCanaries] = {}
        self._watched = np.zeros(0, dtype=np.int64)
        self._sent: dict[str, torch.Tensor | None] = {}
        self._rounds: list[dict[int, np.ndarray]] = []

    def __getattr__(self, name: str) -> Any:  # create_message, get_node_ids, run, ...
        return getattr(self._grid, name)

    def _meet_nodes(self) -> None:
        """Derive every node's canaries once the nodes are known (they register after the ServerApp starts)."""
        if self._canaries:
            return
        config = self._config
        self._canaries = {
            node: gradient_canaries(config.audit, config.seed, node, config.federation.num_clients, self._size)
            for node in sorted(self._grid.get_node_ids())
        }
        # Every coordinate any canary sits on; steps are kept there only.
        self._watched = np.unique(np.concatenate([canaries.coordinates for canaries in self._canaries.values()]))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._meet_nodes()
        messages = list(messages)
        sent = {message.metadata.dst_node_id: self._sent_model(message) for message in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._rounds.append({})
        for reply in replies:
            self._keep(reply, sent.get(reply.metadata.src_node_id))
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._meet_nodes()
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        self._rounds.append({})
        for message, message_id in zip(messages, ids):
            self._sent[message_id] = self._sent_model(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            self._keep(reply, self._sent.pop(reply.metadata.reply_to_message_id, None))
        return replies

    def _sent_model(self, message: Message) -> torch.Tensor | None:
        """The watched coordinates of the model a train instruction carries (None: it carries none)."""
        if ARRAYS_KEY not in message.content.array_records:
            return None
        return self._watched_values(message.content.array_records[ARRAYS_KEY])

    def _watched_values(self, arrays: Any) -> torch.Tensor:
        state = arrays.to_torch_state_dict()
        flat = torch.cat([state[key].reshape(-1).double() for key in self._keys])
        return flat[torch.from_numpy(self._watched)]

    def _keep(self, reply: Message, sent: torch.Tensor | None) -> None:
        if sent is None or reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
            return
        try:
            step = sent - self._watched_values(reply.content.array_records[ARRAYS_KEY])
        except (KeyError, RuntimeError, ValueError):  # not the model's tensors: the strategy rejects it
            return
        self._rounds[-1][reply.metadata.src_node_id] = step.numpy()

    def scored(self) -> tuple[np.ndarray, np.ndarray]:
        """Every canary's (score, membership), nodes in id order; a node never heard from scores 0.

        A coordinate's baseline in a round is the mean step there of the clients that replied
        and hold no canary on it (two clients' canaries may share a coordinate).
        """
        self._meet_nodes()
        where = {node: np.searchsorted(self._watched, canaries.coordinates) for node, canaries in self._canaries.items()}
        scores = {node: np.zeros(len(canaries.coordinates)) for node, canaries in self._canaries.items()}
        for steps in self._rounds:
            total, count = np.zeros(len(self._watched)), np.zeros(len(self._watched))
            for node, step in steps.items():
                free = np.ones(len(self._watched), dtype=bool)
                free[where.get(node, [])] = False
                total += np.where(free, step, 0.0)
                count += free
            baseline = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
            for node, step in steps.items():
                if node in scores:
                    scores[node] += (step - baseline)[where[node]]
        nodes = sorted(self._canaries)
        return (
            np.concatenate([scores[node] for node in nodes]),
            np.concatenate([self._canaries[node].included for node in nodes]),
        )


def mislabelled_scores(model: torch.nn.Module, config: RunConfig, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, membership) of the mislabelled canaries: minus the final model's loss on each."""
    test = load_dataset(MNIST_TEST, data_dir)
    canaries = mislabelled_canaries(
        config.audit, config.seed, config.federation.num_clients, test.tensors[1].numpy(), config.training.num_classes
    )
    images = test.tensors[0][torch.from_numpy(canaries.images)]
    labels = torch.from_numpy(canaries.labels).to(test.tensors[1].dtype)
    return -per_example_losses(model, TensorDataset(images, labels)), canaries.included


@dataclass(frozen=True)
class CanaryAuditReport:
    """An audit run's verdict: the one-run lower bound next to the accountant's epsilon."""

    kind: str
    accountant_epsilon: float
    delta: float
    bound: OneRunBound
    #: The largest bound these canaries could give (every guess right): a ceiling, not a result.
    ceiling: float
    in_scores: np.ndarray
    out_scores: np.ndarray
    seconds: float

    @property
    def contradicts_accountant(self) -> bool:
        """True proves the training gives less privacy than its accountant reports (at 95 %)."""
        return self.bound.epsilon > self.accountant_epsilon

    @property
    def can_contradict(self) -> bool:
        """Whether these canaries could prove a bound above the accountant's epsilon at all.

        Every guess right gives at most `ceiling`, which the 2 m delta term of the bound caps
        near 6.4 at delta = 1e-5 however many canaries: above it, no audit of this kind can
        test the figure.
        """
        return self.ceiling > self.accountant_epsilon

    def to_json(self) -> dict[str, Any]:
        bound = self.bound
        return {
            "audit": "one-run canary audit (Steinke, Nasr and Jagielski, 2023)",
            "canary-kind": self.kind,
            "attack": "white-box" if self.kind == "gradient" else "black-box",
            "accountant-epsilon": self.accountant_epsilon if math.isfinite(self.accountant_epsilon) else None,
            "delta": self.delta,
            "empirical-epsilon-lower-bound": bound.epsilon,
            "confidence": bound.confidence,
            "largest-certifiable-epsilon": self.ceiling,
            "lower-bound-above-accountant-epsilon": self.contradicts_accountant,
            "can-contradict-accountant": self.can_contradict,
            "canaries": bound.canaries,
            "canaries-in": len(self.in_scores),
            "guesses": bound.guesses,
            "correct-guesses": bound.correct,
            "guess-counts-tried": list(bound.guess_counts),
            "seconds": self.seconds,
        }

    def write(self, run_dir: Path) -> Path:
        path = run_dir / AUDIT_FILE
        atomic_write(path, json.dumps(self.to_json(), indent=2).encode())
        return path


def canary_report(
    kind: str, scores: np.ndarray, included: np.ndarray, accountant_epsilon: float, delta: float, seconds: float
) -> CanaryAuditReport:
    """Guess, count and bound (`common.privacy.one_run.lower_bound`) at `CONFIDENCE`."""
    return CanaryAuditReport(
        kind=kind,
        accountant_epsilon=accountant_epsilon,
        delta=delta,
        bound=lower_bound(scores, included, delta, CONFIDENCE),
        ceiling=largest_certifiable(len(scores), delta, CONFIDENCE),
        in_scores=scores[included],
        out_scores=scores[~included],
        seconds=seconds,
    )
