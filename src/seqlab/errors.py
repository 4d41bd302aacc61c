"""Errors the user can act on. The entry points print their message without a traceback."""

from __future__ import annotations

from typing import Any


class SeqlabError(Exception):
    """Base class: the message names the file, key or value and what was expected."""


class DataError(SeqlabError, ValueError):
    """A data file or split is missing, malformed or too small for the configuration."""


class ConfigError(SeqlabError, ValueError):
    """A configuration value is invalid or inconsistent with the data or the hardware."""


def instantiate(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets seqlab's own errors through as they are.

    Hydra wraps whatever the built object's ``__init__`` raises in an ``InstantiationException``
    ("Error in call to target ..."), so a ``ConfigError`` from a datamodule or backbone (a bad
    ``data.split_ratios``) reached the user as Hydra's traceback instead of its one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):  # an object built inside another
            cause = cause.__cause__
        if isinstance(cause, SeqlabError):
            raise cause from None
        raise
