"""LagHistogram: quantiles over 10 ms buckets, never below the true value."""

from __future__ import annotations

import pytest

from agentledger.sinks.lag import BUCKET_MS, LagHistogram


def test_empty_histogram_reports_nothing() -> None:
    assert LagHistogram().as_json() == {
        "lag_rows": 0,
        "lag_p50_ms": None,
        "lag_p99_ms": None,
        "lag_max_ms": None,
    }


def test_quantiles_are_the_upper_edge_of_their_bucket_capped_at_the_max() -> None:
    histogram = LagHistogram()
    # 1,000 rows acknowledged at t=10,000: ages 0..989 ms, then 10 rows at 5,000 ms.
    histogram.add(10_000, [10_000 - age for age in range(990)])
    histogram.add(10_000, [5_000] * 10)
    true_p50 = 499
    assert true_p50 <= histogram.quantile_ms(0.5)  # type: ignore[operator]
    assert histogram.quantile_ms(0.5) == 499 // BUCKET_MS * BUCKET_MS + BUCKET_MS - 1
    assert histogram.quantile_ms(0.99) == 989
    assert histogram.quantile_ms(0.995) == 5_000
    assert histogram.quantile_ms(1.0) == 5_000
    assert histogram.count == 1_000


def test_a_broker_clock_ahead_of_ours_counts_as_zero_lag() -> None:
    histogram = LagHistogram()
    histogram.add(1_000, [1_200])
    assert histogram.as_json()["lag_max_ms"] == 0


def test_quantile_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="quantile"):
        LagHistogram().quantile_ms(0)
