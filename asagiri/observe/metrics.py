"""The coordinator's Prometheus metrics, on a registry passed in (never the global one); served by
``asagiri.promhttp``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..causes import AbortCause, Rule

__all__ = ["CoordinatorMetrics"]


# Round stages, as the histogram labels them: selection, the training wait ("fit") or the
# secure-aggregation stages under it ("fit/advertise", "fit/share", "fit/masked_input",
# "fit/consistency", "fit/unmask", "fit/verify"), evaluation, and the checkpoint write.
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class CoordinatorMetrics:
    """Every metric the coordinator exports (docs/observability.md lists them with the dashboard)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.rounds_completed = Counter("asagiri_rounds_completed", "Rounds aggregated", registry=r)
        self.rounds_aborted = Counter("asagiri_rounds_aborted", "Round attempts aborted, by cause", ["cause"],
                                      registry=r)
        self.round_seconds = Histogram("asagiri_round_seconds", "Wall time of a completed round", registry=r,
                                       buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.stage_seconds = Histogram("asagiri_round_stage_seconds", "Wall time of each stage of a round",
                                       ["stage"], registry=r, buckets=STAGE_BUCKETS)
        self.connected_sites = Gauge("asagiri_connected_sites", "Authenticated site sessions", registry=r)
        self.selected = Gauge("asagiri_round_selected_sites", "Sites selected for the current round", registry=r)
        self.participants = Gauge("asagiri_round_participants", "Updates in the last round", registry=r)
        self.survivors = Gauge("asagiri_secagg_survivors", "Sites whose masked input the last secure round summed",
                               registry=r)
        self.dropped = Counter("asagiri_sites_dropped", "Sites dropped from a round, by the stage they left in",
                               ["stage"], registry=r)
        self.protocol_violations = Counter("asagiri_protocol_violations",
                                           "Channels closed for protocol violations, by kind", ["kind"], registry=r)
        self.refused = Counter("asagiri_refusals", "Handshakes refused and rounds declined, by kind or policy rule",
                               ["kind"], registry=r)
        self.bytes_received = Counter("asagiri_received_bytes", "Bytes received from sites (per closed session)",
                                      registry=r)
        self.bytes_sent = Counter("asagiri_sent_bytes", "Bytes sent to sites (per closed session)", registry=r)
        self.metric = Gauge("asagiri_eval_metric", "Sample-weighted validation metric of the global model",
                            ["name"], registry=r)
        self.site_auc = Gauge("asagiri_site_auc", "Validation AUC of the global model on each site", ["site"],
                              registry=r)
        self.epsilon = Gauge("asagiri_site_epsilon", "Privacy spent, as each site reports it", ["site"], registry=r)
        self.epsilon_left = Gauge("asagiri_site_epsilon_left",
                                  "The configured target epsilon minus what each site reports spent", ["site"],
                                  registry=r)
        # Labelled series appear only once used; these start at zero, so every panel has data.
        for stage in ("selection", "fit", "evaluate", "checkpoint"):
            self.stage_seconds.labels(stage)
        for kind in ("handshake", "session", "round", "out_of_round"):
            self.protocol_violations.labels(kind)
        for cause in AbortCause:  # closed sets: a site cannot grow the label set
            self.rounds_aborted.labels(cause)
        self.dropped.labels("fit")
        for label in ("handshake", *Rule):
            self.refused.labels(label)
