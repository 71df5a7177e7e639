"""The one error type for problems a user fixes in their configuration, files or command line.

Every module that refuses a setting (a gin binding, a model or mesh shape, a router for a causal
stack, a checkpoint that does not fit, a data file with a bad row) raises `ConfigurationError`
or a subclass, with a message that names the problem and the fix. The entry points print such
errors as one `error: ...` line and exit with status 2; anything else is a bug and keeps its
traceback. It subclasses `ValueError` so that library callers catching `ValueError` still do.
This module imports nothing, so that every layer (the seqio task registries included) can use it.
"""


class ConfigurationError(ValueError):
    """A setting, file or argument the user can fix; the message says what and how."""


__all__ = ["ConfigurationError"]
