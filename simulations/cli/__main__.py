"""`python -m simulations.cli`: the `dpfl` program."""

from simulations.cli import run

run()
