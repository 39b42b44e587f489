"""Failures a person can act on. The CLI prints these as one line (the message names the field,
file or command and the fix); any other exception is a bug and keeps its traceback."""


class DistillError(Exception):
    """Base of every error the CLI reports without a traceback."""


class UserError(DistillError, ValueError):
    """Bad input or configuration."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or model the command needs is not there."""


class Unreachable(DistillError, ConnectionError):
    """A service the command talks to does not answer."""
