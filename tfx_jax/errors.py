"""The library's exception types for user mistakes (a bug in tfx_jax keeps its own type)."""


class UserError(Exception):
    """A mistake in what the user asked for; the message names it in one line."""


class ConfigError(UserError):
    """A configuration (or argument combination) the library cannot run."""


class DataError(UserError):
    """Input data that does not have the expected form."""


class WorkdirError(UserError):
    """A working directory that cannot be used as asked."""
