"""Shared pieces of dpfl: model, data, config schema and privacy accounting helpers.

Nothing here knows about a Flower server or client; both sides import it.
"""
