"""User-facing errors.

Anything a user can get wrong (a config value, a path, a missing preparation
step) raises :class:`FedprivError`. The CLI prints its message on one line and
exits with status 2, never a traceback: the message must name the bad value and
say what is expected.
"""


class FedprivError(Exception):
    """A mistake in input or environment that the user can fix."""


class ConfigError(FedprivError):
    """A run-config key or value is invalid."""


class DataError(FedprivError):
    """Prepared data is missing, unreadable, or too small for the configuration."""


class BudgetExhausted(FedprivError):
    """A region's privacy budget does not allow the requested training."""
