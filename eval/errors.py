"""The project's user-error types: what a person gave (a file, a flag, a run folder) is wrong.

Entrypoints print these as one line, `error: <where>: <what> (<how to fix>)`, and exit 2
(`eval.cli.run`); anything else is a programming error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error a user can fix without editing code; the message says where."""


class DataFormatError(UserError, ValueError):
    """A raw data file does not follow its format; the message names the file and line."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs is not there; the message names it."""


class FlagError(UserError, ValueError):
    """A flag (or a config field set by one) has a value outside its allowed range."""


class ConfigError(UserError, ValueError):
    """A configuration file (an HF `config.json`, a run's `run.json`) is unreadable or wrong."""
