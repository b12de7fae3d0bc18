"""Moved to :mod:`omoe.options` (the options of every command, not of training alone); this name
stays importable for code written against it."""

import sys

from omoe import options

sys.modules[__name__] = options
