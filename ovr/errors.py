"""The one exception type for problems the user can fix (bad input, missing files, foreign models)."""


class OvrError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""
