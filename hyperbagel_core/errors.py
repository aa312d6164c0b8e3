"""Typed errors whose messages tell the user what to do."""


class HyperbagelError(Exception):
    """Base class of every error raised on purpose by hyperbagel."""


class CheckpointError(HyperbagelError):
    """A checkpoint folder or file is missing, truncated, of the wrong shape or format."""


class InputError(HyperbagelError, ValueError):
    """A user input (size, scale, prompt, image) cannot be used as given."""
