"""The one exception every checkpoint failure is raised as."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked; the message says why and what to do."""
