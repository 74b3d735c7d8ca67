"""The one user-facing error type of the study."""


class StageError(Exception):
    """A user-facing error: bad input, bad parameter, missing file. Printed as one line, exit code 2."""
