"""The record keys the ServerApp and the ClientApp agree on.

Client and server never import each other; what they exchange is named here once.
"""

from __future__ import annotations

ARRAYS_KEY = "arrays"  # FedAvg's default `arrayrecord_key`
CONFIG_KEY = "config"  # FedAvg's default `configrecord_key`
METRICS_KEY = "metrics"
#: A ConfigRecord with a "reason" string: the client refused this round and sent no weights.
REFUSAL_KEY = "refusal"
SERVER_ROUND = "server-round"  # injected by FedAvg into every round's config
#: The server's name for the run, stable when it resumes after a crash; clients key their
#: noise plan by it. Without it (a server that does not send one) Flower's run id is used.
RUN_KEY = "dpfl-run"

NUM_EXAMPLES = "num-examples"  # FedAvg's default weighting key
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"


def train_metrics(num_examples: int, train_loss: float, epsilon: float, delta: float) -> dict[str, float | int]:
    """The metrics every train reply carries, trained or refused."""
    return {NUM_EXAMPLES: num_examples, TRAIN_LOSS: train_loss, EPSILON: epsilon, DELTA: delta}
