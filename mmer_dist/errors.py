"""Exception types shared by every layer.

Each error message names what failed (model id, tensor name, field) so that a user can act on it
without reading a traceback.
"""


class MmerError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(MmerError, ValueError):
    """Bad user input: settings out of range, mismatched tensors, NaN/Inf, unknown names."""


class FormatError(InvalidInputError):
    """A checkpoint that is not in the format it claims, is corrupt, or has unexpected keys."""


class CorruptCheckpointError(FormatError):
    """A checkpoint file that is damaged (truncated, a header that does not parse or does not fit
    the file): the checkpoint's own problem, which a many-model ingest reports without giving up
    the other models."""


class StoreError(MmerError):
    """A store that is missing, not a store, or in a state the operation cannot work from."""
