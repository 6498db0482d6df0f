"""What every part of the configuration shares: the error a person reads, and strict models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration problem, phrased for a person: ``file: key: reason``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
