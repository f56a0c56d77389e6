"""Typed errors a user can see. Their message is the whole user-facing story: no traceback needed."""


class FluxionError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(FluxionError):
    """A deployment YAML is malformed or has a bad value; the message names the file and field."""


class ModelLoadError(FluxionError):
    """A checkpoint directory is missing files or tensors, or has an unsupported architecture."""
