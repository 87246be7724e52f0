"""Reading a /metrics endpoint back: samples by name and labels, histogram quantiles.

Used by `vlmq top` and the tests; the quantile is the same linear interpolation within a
bucket that PromQL's histogram_quantile() does.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

LabelSet = FrozenSet[Tuple[str, str]]


@dataclass
class Scrape:
    """Samples of one scrape: {sample name: {labels: value}} plus the declared metric types."""

    samples: Dict[str, Dict[LabelSet, float]] = field(default_factory=dict)
    types: Dict[str, str] = field(default_factory=dict)  # family name -> counter/gauge/histogram

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for ls, v in self.samples.get(name, {}).items() if want <= ls)

    def label_values(self, name: str, label: str) -> List[str]:
        return sorted({dict(ls).get(label, "") for ls in self.samples.get(name, {})})

    def buckets(self, name: str, **labels: str) -> Dict[float, float]:
        """Cumulative bucket counts {le: count} of histogram `name`, summed over the other labels."""
        want = set(labels.items())
        out: Dict[float, float] = {}
        for ls, v in self.samples.get(name + "_bucket", {}).items():
            if want <= ls:
                le = float(dict(ls)["le"])
                out[le] = out.get(le, 0.0) + v
        return out


def parse(text: str) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape()
    for fam in text_string_to_metric_families(text):
        scrape.types[fam.name] = fam.type
        for s in fam.samples:
            scrape.samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return scrape


def fetch(url: str, timeout: float = 2.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse(resp.read().decode("utf-8", errors="replace"))


def merge(scrapes: Iterable[Scrape]) -> Scrape:
    """Several endpoints as one (samples with equal labels add up, like sum() in PromQL)."""
    out = Scrape()
    for s in scrapes:
        out.types.update(s.types)
        for name, series in s.samples.items():
            dst = out.samples.setdefault(name, {})
            for ls, v in series.items():
                dst[ls] = dst.get(ls, 0.0) + v
    return out


def delta(new: Dict[float, float], old: Optional[Dict[float, float]]) -> Dict[float, float]:
    """Bucket counts observed between two scrapes (counter resets read as a fresh start)."""
    if not old:
        return dict(new)
    d = {le: c - old.get(le, 0.0) for le, c in new.items()}
    return dict(new) if any(v < 0 for v in d.values()) else d


def quantile(q: float, buckets: Dict[float, float]) -> Optional[float]:
    """histogram_quantile(q, buckets): None when the histogram is empty."""
    bounds: Sequence[Tuple[float, float]] = sorted(buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    total = bounds[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in bounds:
        if count >= rank:
            if math.isinf(le):  # above the highest finite bucket: its bound is the best answer
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
