"""Exceptions raised for bad input; each message names the parameter or file at fault."""


class DwiflowInputError(ValueError):
    """Input that dwiflow cannot use: wrong shape, counts, values or options.

    The message always names the offending parameter or file and what is wrong,
    so the command lines can print it as a one-line error.
    """
