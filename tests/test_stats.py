"""The paired bootstrap the comparison's intervals come from: a constant difference has no spread, noise
around 0 is within noise, the interval's width is what theory says, and unpaired evaluations are refused."""

from __future__ import annotations

import random

import pytest

from tunelab.eval.stats import describe, paired_bootstrap, paired_scores


def test_a_constant_difference_is_significant_with_no_spread():
    base = [random.Random(1).uniform(0, 100) for _ in range(50)]
    d = paired_bootstrap([x + 2.5 for x in base], base)
    assert (d["difference"], d["low"], d["high"], d["significant"]) == (2.5, 2.5, 2.5, True)
    assert describe(d) == "+2.50 [+2.50, +2.50], significant"


def test_noise_around_zero_is_within_noise_and_the_interval_has_the_normal_width():
    rng = random.Random(0)
    a = [rng.gauss(0, 10) for _ in range(400)]
    b = [0.0] * 400
    d = paired_bootstrap(a, b)
    mean = sum(a) / len(a)
    sd = (sum((x - mean) ** 2 for x in a) / (len(a) - 1)) ** 0.5
    half = 1.96 * sd / len(a) ** 0.5  # the normal approximation the percentile bootstrap approaches
    assert d["low"] < 0 < d["high"] and not d["significant"]
    assert (d["high"] - d["low"]) / 2 == pytest.approx(half, rel=0.1)
    assert paired_bootstrap(a, b) == d  # seeded: the same interval every time
    shifted = paired_bootstrap([x + 5 for x in a], b)
    assert shifted["significant"] and shifted["low"] > 0


def test_pairing_matches_instances_by_task_and_id_and_refuses_others():
    a = [{"task": "t", "id": "1", "rougeL": 10.0}, {"task": "t", "id": "2", "rougeL": 20.0}]
    b = [{"task": "t", "id": "2", "rougeL": 5.0}, {"task": "t", "id": "1", "rougeL": 1.0}]
    assert paired_scores(a, b, "rougeL") == ([10.0, 20.0], [1.0, 5.0])
    with pytest.raises(ValueError, match="different instances"):
        paired_scores(a, b[:1], "rougeL")
    with pytest.raises(ValueError, match="same instances"):
        paired_bootstrap([1.0], [1.0, 2.0])
