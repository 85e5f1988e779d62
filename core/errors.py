"""Exceptions raised for bad input; each message names the parameter or file at fault."""

from __future__ import annotations


class DwiflowInputError(ValueError):
    """Input that dwiflow cannot use: wrong shape, counts, values or options.

    The message always names the offending parameter or file and what is wrong, so the
    command lines can print it as a one-line error. Core code names parameters as the Python
    API spells them (``lmax``, ``fa_threshold``), never as a command-line flag; ``parameters``
    lists those names so that a front end can say which of its own spellings they are
    (``--lmax`` on the command line, ``stages.csd.lmax`` in a recon spec).
    """

    def __init__(self, message: str, *, parameters: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.parameters = tuple(parameters)
