"""Adding up what a multi-process gateway's workers report, so that it reads as one gateway.

Every worker keeps its own counters (``_metrics.py``): they are plain
integers on the hot path, and sharing them between processes would put a
lock or an atomic on every request.  The master (``_workers.py``) asks each
worker's admin socket instead, when it is asked itself, and adds the answers:

* ``/held``, ``/load``, ``/stats``: summed per key ((app, revision,
  component), or revision for ``/held``).  Every figure in them is a count,
  a sum or a gauge of requests in flight, so a sum is what one gateway would
  have said.
* ``/metrics``: the Prometheus text of each worker, parsed with
  prometheus-client's own parser and summed per sample (name and labels).
  Histograms sum bucket by bucket, which is exact because every worker
  uses the same bounds.

Counters of a replaced worker restart from 0, so a sum can go down once
after a worker crash; the readers of ``/stats`` and ``/load`` already treat a
reading that went down as a restarted gateway (the canary analysis and the
autoscaler start their window again), and Prometheus does the same with
counter resets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["merge_held", "merge_load", "merge_metrics", "merge_stats"]

_LOAD_SUMS = ("in_flight", "held", "requests", "cold_count", "cold_hold_sum")


def merge_held(answers: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for answer in answers:
        for revision, count in answer.items():
            total[revision] = total.get(revision, 0) + count
    return total


def merge_load(answers: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    total: dict[tuple[str, str, str], dict[str, Any]] = {}
    for answer in answers:
        for entry in answer:
            key = (entry["app"], entry["revision"], entry["component"])
            found = total.get(key)
            if found is None:
                total[key] = dict(entry)
            else:
                for name in _LOAD_SUMS:
                    found[name] += entry[name]
    return list(total.values())


def merge_stats(answers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    bounds: list[float] | None = None
    total: dict[tuple[str, str, str], dict[str, Any]] = {}
    for answer in answers:
        bounds = answer["bounds"] if bounds is None else bounds
        for entry in answer["revisions"]:
            key = (entry["app"], entry["revision"], entry["component"])
            found = total.get(key)
            if found is None:
                total[key] = {**entry, "by_class": list(entry["by_class"]), "buckets": list(entry["buckets"])}
            else:
                found["by_class"] = [a + b for a, b in zip(found["by_class"], entry["by_class"], strict=True)]
                found["buckets"] = [a + b for a, b in zip(found["buckets"], entry["buckets"], strict=True)]
    return {"bounds": bounds if bounds is not None else [], "revisions": list(total.values())}


def merge_metrics(texts: Iterable[bytes], extra: Iterable[Metric] = ()) -> bytes:
    """The workers' expositions summed sample by sample, with ``extra`` families appended."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            summed = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                summed[key] = summed.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), *extra]))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
