"""The exceptions a user can cause: a bad checkpoint, a bad config, a bad request.

Each is a ``ValueError`` so callers that only know Python's types still catch them; the HTTP layer maps them to 4xx.
Messages name the file or field, the value found, and what is allowed.
"""

from __future__ import annotations


class OmniUserError(ValueError):
    """Base of the errors caused by what a user supplied (never by a bug of ours)."""


class CheckpointError(OmniUserError):
    """A model directory or weight file is missing, corrupt, or does not fit the model (names the file or key)."""


class ConfigError(OmniUserError):
    """A configuration value is invalid (names the field, the value and what is allowed)."""


class RequestError(OmniUserError):
    """A request parameter is invalid (names the field, the value and what is allowed)."""
