"""Typed errors. Every failure a user or a peer can cause maps to one of these."""


class FedsqueezeError(Exception):
    """Base class of every error fedsqueeze raises on purpose."""


class ConfigError(FedsqueezeError, ValueError):
    """A run configuration, option, method, codec, model or dataset name is invalid."""


class DataError(ConfigError):
    """A dataset cannot be found or read."""


class PayloadError(FedsqueezeError, ValueError):
    """Bytes received from a peer are corrupt, truncated, oversized or of an unknown format."""
