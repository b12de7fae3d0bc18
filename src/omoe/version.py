"""The package version, apart from ``omoe/__init__`` so that modules under it can read it."""

__version__ = "0.1.0"
