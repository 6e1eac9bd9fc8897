"""Privacy accounting, in one place: every epsilon dpfl plans, charges, prints or audits comes from here.

- `accounting`: epsilon of a history of DP-SGD releases, by an Opacus accountant.
- `planning`: a run's noise multiplier, sampling rate and steps per round, planned once.
- `ledger`: what each record of a data set has spent (the value a client keeps on disk).
- `central`: the client-level epsilon of central DP's released global models.
- `forecast`: what a config will cost, per client and round, before any training.

Importing the package loads none of them, so `dpfl plan` pays only for what it uses.
"""
