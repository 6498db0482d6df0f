"""Attacks on what the coordinator sees: gradient inversion and membership inference (docs/security.md)."""
