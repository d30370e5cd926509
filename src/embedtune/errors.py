"""The one exception type users see: a clear message, never a traceback.

Steps raise `EmbedtuneError` (or `DataError` for bad input rows) with a message that names the file, the line
and the field. The CLI prints the message and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class EmbedtuneError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable server)."""


class DataError(EmbedtuneError):
    """Bad input data. The message lists `FILE:LINE: field: reason` for each problem found."""
