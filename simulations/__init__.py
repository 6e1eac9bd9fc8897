"""Presets (TOML) and the `dpfl` command line: simulations, and later sweeps and plots."""
