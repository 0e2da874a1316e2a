"""User-facing errors: the CLI prints their message on one line and exits non-zero, never a traceback."""


class MoecliError(Exception):
    """Bad input or an unmet requirement, explained in one line."""


class UnsupportedError(MoecliError):
    """The input is valid but moecli cannot run it (architecture, tensor type...)."""
