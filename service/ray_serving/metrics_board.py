"""Every replica's Prometheus metrics in one exposition: each replica sends its own `/metrics`
text (the single-process server's families, labels model/version/operation intact) to the board
every `metrics_push_s`; the ingress's `/metrics` answers the board's merge, where every series
gains `replica` and `node` labels. Histograms stay histograms, so p99 still aggregates across
replicas (`sum by (le) (rate(..._bucket[1m]))`). A replica that stops sending (dead or scaled
down) leaves the exposition after `expiry_s`, as a vanished scrape target would."""
from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass
class ReplicaExposition:
    replica: str
    node: str
    text: str
    received: float  # time.monotonic() on the board


class MergedFamilies:
    """A prometheus_client collector over the latest exposition of each live replica."""

    def __init__(self, expositions: list[ReplicaExposition]) -> None:
        self.expositions = expositions

    def collect(self):
        families: dict[str, Metric] = {}
        for exposition in self.expositions:
            extra = {"replica": exposition.replica, "node": exposition.node}
            for family in text_string_to_metric_families(exposition.text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                merged.samples.extend(Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar) for s in family.samples)
        yield from families.values()


def merge_expositions(expositions: list[ReplicaExposition]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedFamilies(expositions))
    return generate_latest(registry)


class ExpositionBoard:
    """The board's state: the latest text of each replica, dropped once older than `expiry_s`."""

    def __init__(self, expiry_s: float) -> None:
        self.expiry_s = expiry_s
        self.latest: dict[str, ReplicaExposition] = {}

    def push(self, replica: str, node: str, text: str) -> None:
        self.latest[replica] = ReplicaExposition(replica, node, text, time.monotonic())

    def forget(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def exposition(self) -> bytes:
        now = time.monotonic()
        self.latest = {k: e for k, e in self.latest.items() if now - e.received <= self.expiry_s}
        return merge_expositions(sorted(self.latest.values(), key=lambda e: e.replica))
