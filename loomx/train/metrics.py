"""Loom's deviation metrics: per-sample deviation buckets and the 0–100 quality score.

For each sample with expected value ``e`` and prediction ``a``::

    deviation = |a - e| · 100          if |e| < 1e-10
              = |(a - e) / e| · 100    otherwise          (NaN or ±Inf → 100)

Buckets have inclusive upper bounds, tested in order: 0-10%, 10-20%, 20-30%, 30-40%, 40-50%,
50-100%, 100%+ (a "failure"). The quality score is the mean over samples of
``max(0, 100 - deviation)``, a value in [0, 100]. For classification the prediction is the
argmax class index compared numerically with the label, exactly as Loom scores it (class 2
predicted as 3 is a 50 % deviation); read :attr:`Evaluation.accuracy` for 0/1 accuracy.

This module works on host Python floats: the values arrive in one copy after evaluation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError

BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("0-10%", 0.0, 10.0), ("10-20%", 10.0, 20.0), ("20-30%", 20.0, 30.0),
    ("30-40%", 30.0, 40.0), ("40-50%", 40.0, 50.0), ("50-100%", 50.0, 100.0),
    ("100%+", 100.0, math.inf))
FAILURE_BUCKET = "100%+"
_JSON_INF = 1e9


def deviation_percent(expected: float, actual: float) -> float:
    """Loom's per-sample deviation in percent (NaN/Inf anywhere → 100)."""
    if not (math.isfinite(expected) and math.isfinite(actual)):
        return 100.0
    if abs(expected) < 1e-10:
        dev = abs(actual - expected) * 100.0
    else:
        dev = abs((actual - expected) / expected) * 100.0
    return dev if math.isfinite(dev) else 100.0


def bucket_of(deviation: float) -> str:
    """The bucket name of a deviation (inclusive upper bounds)."""
    for name, _, high in BUCKETS:
        if deviation <= high:
            return name
    return FAILURE_BUCKET


@dataclass
class SampleResult:
    """One evaluated sample."""

    sample_index: int
    expected: float
    actual: float
    deviation: float
    bucket: str


@dataclass
class DeviationMetrics:
    """Bucket counts, the quality score and every per-sample result.

    Build with :meth:`from_values` (or :meth:`update` per sample then :meth:`finalize`).
    """

    results: list[SampleResult] = field(default_factory=list)
    buckets: dict[str, list[int]] = field(
        default_factory=lambda: {name: [] for name, _, _ in BUCKETS})
    score: float = 0.0
    average_deviation: float = 0.0
    failures: int = 0

    @property
    def total_samples(self) -> int:
        return len(self.results)

    def update(self, index: int, expected: float, actual: float) -> SampleResult:
        """Score one sample and file it in its bucket."""
        dev = deviation_percent(float(expected), float(actual))
        r = SampleResult(int(index), float(expected), float(actual), dev, bucket_of(dev))
        self.results.append(r)
        self.buckets[r.bucket].append(r.sample_index)
        if r.bucket == FAILURE_BUCKET:
            self.failures += 1
        return r

    def finalize(self) -> DeviationMetrics:
        """Compute the score (mean of ``max(0, 100 - dev)``) and the average deviation."""
        n = self.total_samples
        if n == 0:
            self.score = self.average_deviation = 0.0
            return self
        self.score = sum(max(0.0, 100.0 - r.deviation) for r in self.results) / n
        self.average_deviation = sum(r.deviation for r in self.results) / n
        return self

    @classmethod
    def from_values(cls, expected: list[float], actual: list[float]) -> DeviationMetrics:
        """Metrics of paired host values (Loom's ``EvaluateModel``); lengths must match."""
        if len(expected) != len(actual):
            raise FormatError(f"expected has {len(expected)} values but actual has "
                              f"{len(actual)}; they must pair up one to one")
        m = cls()
        for i, (e, a) in enumerate(zip(expected, actual)):
            m.update(i, e, a)
        return m.finalize()

    def counts(self) -> dict[str, int]:
        """``{bucket name: count}`` in bucket order."""
        return {name: len(self.buckets[name]) for name, _, _ in BUCKETS}

    def samples_in_bucket(self, name: str) -> list[int]:
        """Sample indices filed under bucket ``name``."""
        if name not in self.buckets:
            raise KeyError(f"unknown bucket {name!r}; buckets: {[b for b, _, _ in BUCKETS]}")
        return list(self.buckets[name])

    def worst_samples(self, n: int = 5) -> list[SampleResult]:
        """The ``n`` samples with the largest deviation, largest first."""
        return sorted(self.results, key=lambda r: r.deviation, reverse=True)[:n]

    def summary(self) -> str:
        """A printable table: one bar character per 2 % of samples in each bucket."""
        n = max(1, self.total_samples)
        lines = [f"quality score {self.score:.2f}/100, average deviation "
                 f"{self.average_deviation:.2f}%, failures {self.failures} of "
                 f"{self.total_samples}"]
        for name, count in self.counts().items():
            pct = 100.0 * count / n
            lines.append(f"  {name:>8} {count:6d} ({pct:5.1f}%) {'█' * int(pct / 2)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """Loom's JSON layout (±Inf written as ±1e9, NaN as 0)."""
        def clean(v: float) -> float:
            if math.isnan(v):
                return 0.0
            if math.isinf(v):
                return _JSON_INF if v > 0 else -_JSON_INF
            return v

        return {
            "total_samples": self.total_samples, "score": clean(self.score),
            "avg_deviation": clean(self.average_deviation), "failures": self.failures,
            "buckets": {name: {"range_min": clean(lo), "range_max": clean(hi),
                               "count": len(self.buckets[name]),
                               "samples": list(self.buckets[name])}
                        for name, lo, hi in BUCKETS},
            "results": [{"sample_index": r.sample_index, "expected": clean(r.expected),
                         "actual": clean(r.actual), "deviation": clean(r.deviation),
                         "bucket": r.bucket} for r in self.results],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, doc: dict) -> DeviationMetrics:
        """Inverse of :meth:`to_dict`."""
        try:
            m = cls()
            for r in doc["results"]:
                res = SampleResult(int(r["sample_index"]), float(r["expected"]),
                                   float(r["actual"]), float(r["deviation"]), str(r["bucket"]))
                m.results.append(res)
            m.buckets = {name: [int(i) for i in doc["buckets"][name]["samples"]]
                         for name, _, _ in BUCKETS}
            m.failures = int(doc["failures"])
            m.score = float(doc["score"])
            m.average_deviation = float(doc["avg_deviation"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"not a deviation-metrics document: missing or bad {exc}") from exc
        return m

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviationMetrics:
        """Read a file written by :meth:`save` (or by Loom's ``SaveMetrics``)."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FormatError(f"cannot read deviation metrics from {path}: {exc}") from exc
        return cls.from_dict(doc)
