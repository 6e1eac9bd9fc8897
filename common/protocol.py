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
EPSILON = "epsilon"
DELTA = "delta"


def train_metrics(num_examples: int, epsilon: float, delta: float) -> dict[str, float | int]:
    """The metrics every train reply carries, trained or refused.

    Nothing here may be computed from the private data outside the DP mechanism: the number
    of examples is public by assumption (the sampling rate, and so the noise plan, depends
    on it), epsilon and delta are the accountant's. A training loss would be a function of
    the private data that no accountant covers, so none is sent.
    """
    return {NUM_EXAMPLES: num_examples, EPSILON: epsilon, DELTA: delta}
