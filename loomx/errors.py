"""The loomx error hierarchy: every error a user can cause is a :class:`LoomxError`."""

from __future__ import annotations


class LoomxError(Exception):
    """Base class: the message says what was wrong and what to do about it."""


class BackendUnavailableError(LoomxError):
    """A requested backend cannot be used (not installed, no driver, no device)."""


class ShapeError(LoomxError, ValueError):
    """An input or parameter has the wrong shape for a layer or network."""


class ConfigError(LoomxError, ValueError):
    """A layer or network configuration is invalid."""


class FormatError(LoomxError, ValueError):
    """A file is corrupt, truncated, inconsistent or of an unsupported format."""


class TrainingError(LoomxError, RuntimeError):
    """Training cannot proceed (bad data, NaN loss, ...)."""
