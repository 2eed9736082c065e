"""The library's own exceptions for user mistakes (minimal; the lead's version replaces it)."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave (config, data, directory), said in one line."""


class ConfigError(UserError, ValueError):
    """A configuration value or combination that cannot work."""


class DataError(UserError, ValueError):
    """Input data or a checkpoint's contents that do not fit."""


class WorkdirError(UserError):
    """A work or checkpoint directory that is missing or not what was expected."""


def require(condition, message: str, error: type = ConfigError) -> None:
    """Raises ``error(message)`` unless ``condition``."""
    if not condition:
        raise error(message)
