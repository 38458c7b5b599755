"""User-facing errors.

Anything raised as :class:`ForgetlessError` is a mistake the user can fix (a missing file, a
malformed row, an unknown name). The CLI prints its message on one line and exits non-zero,
without a traceback. Bugs stay ordinary exceptions so they keep their traceback.
"""


class ForgetlessError(Exception):
    """A user mistake, reported as a single line."""
