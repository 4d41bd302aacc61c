"""Errors the user can act on. The entry points print their message without a traceback."""


class SeqlabError(Exception):
    """Base class: the message names the file, key or value and what was expected."""


class DataError(SeqlabError, ValueError):
    """A data file or split is missing, malformed or too small for the configuration."""


class ConfigError(SeqlabError, ValueError):
    """A configuration value is invalid or inconsistent with the data or the hardware."""
