"""Exceptions that the CLI turns into a one-line error (no traceback unless ``--debug``)."""


class OMoEError(Exception):
    """Base class of every user-facing error raised by omoe."""


class ConfigError(OMoEError, ValueError):
    """A configuration value is out of range or unknown; the message lists what is allowed."""


class TargetNotFoundError(OMoEError, ValueError):
    """The requested modules are not in the model; the message lists what the model has."""


class AdapterLoadError(OMoEError, ValueError):
    """An adapter on disk does not fit the model, or is not in a format we load."""


class RunError(OMoEError, RuntimeError):
    """The input was valid but the run failed on the way (the CLI exits 1, not 2)."""


class NonFiniteError(RunError, ArithmeticError):
    """A loss, gradient norm, score or log-likelihood came out NaN or infinite; the message names where."""
