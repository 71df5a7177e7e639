"""The error every checkpoint reader raises for a problem the user can fix (a path that holds
no checkpoint, a model that does not fit it); entry points turn it into exit status 2."""


from moe.errors import ConfigurationError


class CheckpointError(ConfigurationError):
    """A checkpoint cannot be found or does not fit the model it is restored into."""


__all__ = ["CheckpointError"]
