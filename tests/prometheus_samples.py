"""Prometheus text in tests: parsed into (sample name, sorted labels) -> value, read by name
and labels, and compared before and after."""
from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple], float]


def samples_of(text: str) -> Samples:
    """Prometheus text exposition parsed (prometheus_client's parser)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def registry_samples(registry: CollectorRegistry) -> Samples:
    """What `registry` would serve at /metrics, parsed."""
    from chroma_agent.serving.metrics import exposition

    return samples_of(exposition(registry)[0].decode())


def scrape(base: str) -> Samples:
    """GET `base`/metrics (Prometheus' text content type) parsed."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
        return samples_of(r.read().decode())


def value(samples: Samples, name: str, **labels) -> float:
    """A sample's value (0 when absent: a counter not moved yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels) -> float:
    """How far a sample moved between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)
