"""User-facing errors.

A :class:`LowbitError` carries a one-line message that says what is wrong and what to do about it.
The CLI prints it without a traceback; library users can catch it like any exception.
"""


class LowbitError(Exception):
    """An error caused by input the user can fix (a path, a file, an option, the network)."""
