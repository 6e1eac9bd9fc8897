"""Errors a user can fix.

Everything that is the user's to fix (config, data, budgets) raises a subclass of
`DpflError` whose message is one line saying what is wrong and how to fix it. Entry
points print that line instead of a traceback.
"""


class DpflError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(DpflError):
    """A config value is missing, malformed or out of range."""


class DataError(DpflError):
    """The MNIST files are missing, truncated or corrupt."""
