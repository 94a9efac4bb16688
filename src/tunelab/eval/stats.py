"""Whether a difference between two models is real: the paired bootstrap over the instances both answered.

    d = paired_bootstrap(instruct_scores, base_scores)     # per-instance ROUGE-L of two models, same order
    d["difference"], d["low"], d["high"], d["significant"]

Both models answered the same instances, so the question is the mean of the per-instance differences:
resampling instances with replacement (10,000 times, seeded) and taking the 2.5th and 97.5th percentiles
of the resampled means gives its 95% interval (the percentile bootstrap, as Koehn 2004 and Dror et al.
2018 use it for NLP comparisons). A difference whose interval holds 0 is within the noise of this many
instances. Pairing removes what is common to both models (an instance every model finds hard), which
makes the interval much narrower than the two models' own intervals would suggest.
"""

from __future__ import annotations

from collections.abc import Sequence

RESAMPLES = 10_000
CONFIDENCE = 0.95


def bootstrap_interval(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean of `values` (instances resampled with replacement)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1,000 resamples at a time bounds the index matrix's memory
        count = min(1000, resamples - start)
        means[start : start + count] = v[rng.integers(0, len(v), size=(count, len(v)))].mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> dict:
    """The mean of a - b over paired instances with its percentile-bootstrap interval; `significant` when
    the interval excludes 0."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired scores need the same instances: {len(a)} against {len(b)}")
    if not len(a):
        raise ValueError("no instances to compare")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    low, high = bootstrap_interval(d.tolist(), resamples, seed, confidence)
    return {
        "difference": round(float(d.mean()), 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
        "instances": len(d),
        "confidence": confidence,
        "resamples": resamples,
        "significant": bool(low > 0 or high < 0),
    }


def paired_scores(rows_a: list[dict], rows_b: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """The two models' scores on the instances both have, matched by (task, id), in `rows_a`'s order."""
    other = {(r.get("task"), r["id"]): r[metric] for r in rows_b}
    keys = [(r.get("task"), r["id"]) for r in rows_a]
    missing = [k for k in keys if k not in other]
    if missing or len(keys) != len(other):
        raise ValueError(
            f"the two evaluations hold different instances ({len(keys)} and {len(other)}; "
            f"e.g. {missing[:1] or 'extra ones'})"
        )
    return [r[metric] for r in rows_a], [other[k] for k in keys]


def describe(d: dict, unit: str = "") -> str:
    """'+5.21 [+3.02, +7.44], significant' in words a report can use."""
    verdict = "significant" if d["significant"] else "within noise"
    return f"{d['difference']:+.2f}{unit} [{d['low']:+.2f}, {d['high']:+.2f}], {verdict}"
