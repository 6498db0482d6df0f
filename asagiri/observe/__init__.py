"""Observability: hash-chained audit log, metrics log, Prometheus metrics."""
