"""The errors a user fixes in their data: both are `ConfigurationError`s, so the entry points
print them as one `error: ...` line (exit status 2).

They are raised while seqio builds a dataset: the local readers are consumed eagerly in Python
(`sources.dataset_from_examples`), never inside a `tf.data` function, so the message reaches
the user as written instead of wrapped in a TensorFlow error.
"""

from moe.errors import ConfigurationError


class MissingDataError(ConfigurationError, FileNotFoundError):
    """The data of a task is neither prepared in TFDS nor present as local files."""


class DataFileError(ConfigurationError):
    """A local benchmark file has a row that cannot be read (missing field, unknown label, bad
    JSON); the message names the file, the line and the field or value."""


__all__ = ["DataFileError", "MissingDataError"]
