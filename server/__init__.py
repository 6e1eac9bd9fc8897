"""The dpfl ServerApp: strategy, aggregation, central evaluation, results and checkpoints."""
