"""Exceptions that the CLI turns into a one-line error (no traceback unless ``--debug``)."""


class OMoEError(Exception):
    """Base class of every user-facing error raised by omoe."""


class ConfigError(OMoEError, ValueError):
    """A configuration value is out of range or unknown; the message lists what is allowed."""


class TargetNotFoundError(OMoEError, ValueError):
    """The requested modules are not in the model; the message lists what the model has."""


class AdapterLoadError(OMoEError, ValueError):
    """An adapter on disk does not fit the model, or is not in a format we load."""
