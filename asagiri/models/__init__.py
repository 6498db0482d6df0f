"""Models built by name from ``ModelConfig`` (our own code; torchvision is not used)."""

from .registry import build, is_norm_key, shared_keys

__all__ = ["build", "is_norm_key", "shared_keys"]
