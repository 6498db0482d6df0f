"""A site's own Prometheus metrics (``metrics_port`` in its site.yaml; off by default).  They
stay on the site's machine: what it trains, what it has spent, and what it refused."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..causes import Rule

__all__ = ["SiteMetrics"]


class SiteMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.step_seconds = Histogram("asagiri_site_train_step_seconds", "Mean time of one training step, per round",
                                      registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10))
        self.samples_per_second = Gauge("asagiri_site_train_samples_per_second",
                                        "Training examples per second in the last round (all local epochs)",
                                        registry=r)
        self.rounds_trained = Counter("asagiri_site_rounds_trained", "Rounds this site trained in", registry=r)
        self.epsilon = Gauge("asagiri_site_epsilon_spent", "Privacy spent so far (DP-SGD runs)", registry=r)
        self.refusals = Counter("asagiri_site_refusals", "Rounds or runs this site refused, by policy rule",
                                ["rule"], registry=r)
        for rule in Rule:
            self.refusals.labels(rule)

    def trained(self, *, examples: int, steps: int, seconds: float, epsilon: float | None) -> None:
        self.rounds_trained.inc()
        if steps > 0:
            self.step_seconds.observe(seconds / steps)
        if seconds > 0:
            self.samples_per_second.set(examples / seconds)
        if epsilon is not None:
            self.epsilon.set(epsilon)
