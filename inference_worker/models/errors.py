"""Errors of model loading (importable without torch or transformers)."""


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says why."""
