"""User-facing errors.

A `SlimlmError` is a problem with the user's input or environment that one line can explain,
with the fix. The CLI prints it on stderr without a traceback (unless --debug); anything else
is a bug and keeps its traceback.
"""


class SlimlmError(Exception):
    """Bad input or environment: the message names the problem and the fix."""


class ModelNotFound(SlimlmError):
    pass


class UnsupportedModel(SlimlmError):
    pass


class BackendUnavailable(SlimlmError):
    pass
