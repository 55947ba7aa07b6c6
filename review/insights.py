"""The batch review: who spent most in a window, why their spend grew against the previous
window of the same length, and which cheaper models would have done the same work.

Everything money is integer nano-USD (sums are Int128 in ClickHouse, int in Python); ratios are
computed only for display. Counters and costs come from the rollups when the window's bounds
fall on a rollup grain (the CLI aligns them to the minute), otherwise from `calls`; both give
the same numbers (tested). Spawn structure and tasks come from `calls` (not in the rollups).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median_low

from agentledger.sinks.migrations import LATENCY_BUCKET_SQL, LATENCY_P50_SQL, ROLLUP_GRAINS

from .escalation import Escalations, escalations, model_ranks
from .forecast import BudgetForecast, BudgetLine, forecast_budgets
from .query import QueryClient

__all__ = [
    "DIMENSIONS",
    "EXPENSIVE_FACTOR",
    "LATENCY_TOLERANCE",
    "MIN_CALLS_FOR_REMAP",
    "SUCCESS_TOLERANCE",
    "KeyModelStats",
    "Remap",
    "Review",
    "SpendPoint",
    "Spender",
    "build_review",
    "expensive_models",
    "key_model_stats",
    "recommend_remaps",
    "rollup_pieces",
    "source_for",
    "spend_by_key",
    "spend_over_time",
]

# --by value -> (rollup family, its column, expression over `calls`). A fixed whitelist: these
# are the only identifiers ever interpolated into the review SQL.
DIMENSIONS: dict[str, tuple[str, str, str]] = {
    "agent": ("calls_by", "agent_id", "agent_id"),
    "pool": ("calls_by", "pool", "ifNull(pool, '')"),
    "workflow": ("workflows_by", "workflow_id", "ifNull(workflow_id, '')"),
    "task_type": ("calls_by", "task_type", "ifNull(task_type, '')"),
    "model": ("calls_by", "used_model", "used_model"),
}

# A model is "expensive" when its cost per token is at least this many times the median cost
# per token of the models used in the window (the lower median, so with two models the cheaper
# one is the reference).
EXPENSIVE_FACTOR = 3
# Remap evidence: both models need this many calls for the same agent or task type, the cheaper
# one's success rate may be at most SUCCESS_TOLERANCE below, its p50 latency at most
# LATENCY_TOLERANCE times the other's. Below the sample size nothing is recommended.
MIN_CALLS_FOR_REMAP = 30
SUCCESS_TOLERANCE = 0.02
LATENCY_TOLERANCE = 1.25

_GRAIN_MS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


def source_for(since_ms: int, until_ms: int) -> str | None:
    """The coarsest rollup grain both bounds fall on, or None (then the raw table is used)."""
    for grain in reversed(list(ROLLUP_GRAINS)):
        step = _GRAIN_MS[grain]
        if since_ms % step == 0 and until_ms % step == 0:
            return grain
    return None


@dataclass(frozen=True)
class KeyModelStats:
    key: str
    model: str
    calls: int
    failures: int
    retries: int
    tokens: int
    cost_nano_usd: int
    failed_cost_nano_usd: int
    retry_cost_nano_usd: int
    latency_p50_ms: float


def rollup_pieces(since_ms: int, until_ms: int) -> list[tuple[str, int, int]] | None:
    """[since_ms, until_ms) as (grain, lo, hi) pieces, coarsest grain first: whole days, then
    the hours and minutes around them, so a 24 h window ending at a minute reads ~24 hour rows
    per key instead of 1,440 minute rows. None when a bound is not on a minute (raw `calls`)."""
    if since_ms % _GRAIN_MS["minute"] or until_ms % _GRAIN_MS["minute"]:
        return None
    pieces: list[tuple[str, int, int]] = []

    def split(lo: int, hi: int, grains: list[str]) -> None:
        if lo >= hi:
            return
        grain, finer = grains[0], grains[1:]
        step = _GRAIN_MS[grain]
        inner_lo, inner_hi = -(-lo // step) * step, hi // step * step
        if not finer:
            pieces.append((grain, lo, hi))
        elif inner_lo >= inner_hi:
            split(lo, hi, finer)
        else:
            pieces.append((grain, inner_lo, inner_hi))
            split(lo, inner_lo, finer)
            split(inner_hi, hi, finer)

    split(since_ms, until_ms, ["day", "hour", "minute"])
    return pieces


def _window_sql(
    family: str | None, pieces: list[tuple[str, int, int]], key_column: str, latency: bool
) -> tuple[str, dict[str, object]]:
    # The p50 (from the latency histograms, LATENCY_P50_SQL) is only needed by the remap
    # recommendations, so other callers skip the merge.
    p50 = LATENCY_P50_SQL if latency else "0.0"
    if family is not None:
        parts = []
        parameters: dict[str, object] = {}
        for index, (grain, lo, hi) in enumerate(pieces):
            parameters[f"lo{index}"], parameters[f"hi{index}"] = lo, hi
            histogram = ", latency_hist" if latency else ""
            parts.append(
                f"""SELECT {key_column} AS key, used_model, calls, failures, retries, input_tokens,
    output_tokens, cost_nano_usd, failed_cost_nano_usd, retry_cost_nano_usd{histogram}
FROM {family}_{grain}
WHERE bucket >= toDateTime(intDiv({{lo{index}:Int64}}, 1000), 'UTC')
  AND bucket < toDateTime(intDiv({{hi{index}:Int64}}, 1000), 'UTC')"""  # noqa: S608 - names from DIMENSIONS and ROLLUP_GRAINS, values are parameters
            )
        histogram = "WITH sumMap(latency_hist) AS h" if latency else ""
        sql = f"""{histogram}
SELECT key, used_model, sum(calls), sum(failures), sum(retries),
    sum(input_tokens) + sum(output_tokens), sum(cost_nano_usd), sum(failed_cost_nano_usd),
    sum(retry_cost_nano_usd), {p50}
FROM ({" UNION ALL ".join(parts)})
GROUP BY key, used_model
ORDER BY key, used_model
"""  # noqa: S608 - key_column and family come from DIMENSIONS, grains from ROLLUP_GRAINS
        return sql, parameters
    histogram = f"WITH sumMap(map({LATENCY_BUCKET_SQL}, toUInt64(1))) AS h" if latency else ""
    sql = f"""{histogram}
SELECT {key_column} AS key, used_model, count(), countIf(status != 'ok'), countIf(attempt > 1),
    sum(input_tokens + output_tokens), sum(toInt128(cost_nano_usd)),
    sumIf(toInt128(cost_nano_usd), status != 'ok'), sumIf(toInt128(cost_nano_usd), attempt > 1),
    {p50}
FROM calls
WHERE event_time >= fromUnixTimestamp64Milli({{lo0:Int64}}, 'UTC')
  AND event_time < fromUnixTimestamp64Milli({{hi0:Int64}}, 'UTC')
GROUP BY key, used_model
ORDER BY key, used_model
"""  # noqa: S608 - key_column comes from DIMENSIONS only
    return sql, {"lo0": pieces[0][1], "hi0": pieces[0][2]}


def _check_window(since_ms: int, until_ms: int) -> None:
    if since_ms < 0 or until_ms < since_ms:
        raise ValueError(f"need 0 <= since_ms <= until_ms, got {since_ms} and {until_ms}")


def _dimension(by: str) -> tuple[str, str, str]:
    try:
        return DIMENSIONS[by]
    except KeyError:
        raise ValueError(f"--by must be one of {', '.join(DIMENSIONS)}, got {by!r}") from None


def key_model_stats(
    client: QueryClient,
    by: str,
    since_ms: int,
    until_ms: int,
    *,
    use_rollups: bool = True,
    latency: bool = True,
) -> list[KeyModelStats]:
    """Per key of `by` and model: counters, cost and (if `latency`) p50 latency, else 0.0."""
    _check_window(since_ms, until_ms)
    family, rollup_column, raw_expression = _dimension(by)
    pieces = rollup_pieces(since_ms, until_ms) if use_rollups else None
    if since_ms == until_ms:
        return []
    if pieces is None:
        sql, parameters = _window_sql(None, [("", since_ms, until_ms)], raw_expression, latency)
    else:
        sql, parameters = _window_sql(family, pieces, rollup_column, latency)
    result = client.query(sql, parameters)
    return [
        KeyModelStats(
            str(r[0]),
            str(r[1]),
            int(r[2]),
            int(r[3]),
            int(r[4]),
            int(r[5]),
            int(r[6]),
            int(r[7]),
            int(r[8]),
            float(r[9]),
        )
        for r in result.rows
    ]


def expensive_models(stats: list[KeyModelStats], factor: int = EXPENSIVE_FACTOR) -> set[str]:
    per_model: dict[str, list[int]] = {}
    for s in stats:
        totals = per_model.setdefault(s.model, [0, 0])
        totals[0] += s.cost_nano_usd
        totals[1] += s.tokens
    rates = {m: c / t for m, (c, t) in per_model.items() if t > 0}
    if len(rates) < 2:
        return set()
    middle = median_low(rates.values())
    return {m for m, rate in rates.items() if middle > 0 and rate >= factor * middle}


@dataclass(frozen=True)
class Structure:
    max_spawn_depth: int
    max_fan_out: int
    ok_tasks: int


def _structure(
    client: QueryClient,
    by: str,
    prev_since_ms: int,
    since_ms: int,
    until_ms: int,
    keys: list[str],
) -> tuple[dict[str, Structure], dict[str, Structure]]:
    """Spawn depth, fan-out and successful tasks of `keys` in the current and the previous
    window, in one read of `calls` (not in the rollups). Only the keys shown are read: by
    agent the table's key starts with agent_id, so that skips most of it."""
    _, _, raw = _dimension(by)
    # By agent, fan-out belongs to the parent: how many distinct agents it spawned.
    fan_key = "ifNull(parent_agent_id, '')" if by == "agent" else raw
    window = (
        "event_time >= fromUnixTimestamp64Milli({prev_since_ms:Int64}, 'UTC') "
        "AND event_time < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')"
    )
    current = "event_time >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"
    sql = f"""
SELECT key, now, max(depth), max(fan_out), sum(ok_tasks) FROM (
    SELECT {raw} AS key, {current} AS now, max(spawn_depth) AS depth, toUInt64(0) AS fan_out,
        uniqExactIf(task_id, status = 'ok' AND task_id IS NOT NULL) AS ok_tasks
    FROM calls WHERE {window} AND {raw} IN {{keys:Array(String)}} GROUP BY key, now
    UNION ALL
    SELECT key, now, toUInt16(0), max(children), toUInt64(0) FROM (
        SELECT {fan_key} AS key, {current} AS now, parent_agent_id,
            uniqExact(agent_id) AS children
        FROM calls WHERE {window} AND parent_agent_id IS NOT NULL
            AND {fan_key} IN {{keys:Array(String)}}
        GROUP BY key, now, parent_agent_id
    ) GROUP BY key, now
) GROUP BY key, now
"""  # noqa: S608 - raw/fan_key come from DIMENSIONS only; values are parameters
    result = client.query(
        sql,
        {
            "prev_since_ms": prev_since_ms,
            "since_ms": since_ms,
            "until_ms": until_ms,
            "keys": keys,
        },
    )
    now: dict[str, Structure] = {}
    before: dict[str, Structure] = {}
    for r in result.rows:
        target = now if r[1] in (1, True) else before
        target[str(r[0])] = Structure(int(r[2]), int(r[3]), int(r[4]))
    return now, before


@dataclass(frozen=True)
class Spender:
    key: str
    calls: int
    cost_nano_usd: int
    retry_cost_nano_usd: int
    failed_cost_nano_usd: int
    expensive_cost_nano_usd: int
    max_spawn_depth: int
    max_fan_out: int
    ok_tasks: int

    def share(self, part: int) -> float | None:
        return part / self.cost_nano_usd if self.cost_nano_usd else None

    @property
    def cost_per_ok_task_nano(self) -> int | None:
        return self.cost_nano_usd // self.ok_tasks if self.ok_tasks else None


def _spenders(
    stats: list[KeyModelStats], expensive: set[str], structure: dict[str, Structure]
) -> dict[str, Spender]:
    sums: dict[str, list[int]] = {}
    for s in stats:
        acc = sums.setdefault(s.key, [0, 0, 0, 0, 0])
        acc[0] += s.calls
        acc[1] += s.cost_nano_usd
        acc[2] += s.retry_cost_nano_usd
        acc[3] += s.failed_cost_nano_usd
        acc[4] += s.cost_nano_usd if s.model in expensive else 0
    spenders = {}
    for key, (calls, cost, retry, failed, pricey) in sums.items():
        shape = structure.get(key, Structure(0, 0, 0))
        spenders[key] = Spender(
            key,
            calls,
            cost,
            retry,
            failed,
            pricey,
            shape.max_spawn_depth,
            shape.max_fan_out,
            shape.ok_tasks,
        )
    return spenders


@dataclass(frozen=True)
class Remap:
    scope_kind: str  # "agent" or "task_type"
    scope: str
    from_model: str
    to_model: str
    from_calls: int
    to_calls: int
    from_success: float
    to_success: float
    from_p50_ms: float
    to_p50_ms: float
    saving_nano_usd: int


def recommend_remaps(
    stats: list[KeyModelStats],
    scope_kind: str,
    *,
    min_calls: int = MIN_CALLS_FOR_REMAP,
    success_tolerance: float = SUCCESS_TOLERANCE,
    latency_tolerance: float = LATENCY_TOLERANCE,
) -> list[Remap]:
    """For each scope and model A, the cheapest model B (per call) used in the same scope with
    enough calls on both sides, a success rate within tolerance and a p50 latency within
    tolerance. Saving = what A's calls would have cost at B's cost per call."""
    by_scope: dict[str, list[KeyModelStats]] = {}
    for s in stats:
        if s.key:
            by_scope.setdefault(s.key, []).append(s)
    remaps = []
    for scope, models in sorted(by_scope.items()):
        solid = [m for m in models if m.calls >= min_calls]
        for a in solid:
            best: tuple[int, KeyModelStats] | None = None
            for b in solid:
                if b.model == a.model:
                    continue
                # a.cost/a.calls > b.cost/b.calls, in integers.
                if a.cost_nano_usd * b.calls <= b.cost_nano_usd * a.calls:
                    continue
                if _success(b) < _success(a) - success_tolerance:
                    continue
                if b.latency_p50_ms > latency_tolerance * a.latency_p50_ms:
                    continue
                saving = a.cost_nano_usd - (a.calls * b.cost_nano_usd) // b.calls
                if best is None or saving > best[0]:
                    best = (saving, b)
            if best is not None:
                saving, b = best
                remaps.append(
                    Remap(
                        scope_kind,
                        scope,
                        a.model,
                        b.model,
                        a.calls,
                        b.calls,
                        _success(a),
                        _success(b),
                        a.latency_p50_ms,
                        b.latency_p50_ms,
                        saving,
                    )
                )
    return sorted(remaps, key=lambda r: (-r.saving_nano_usd, r.scope, r.from_model))


def _success(s: KeyModelStats) -> float:
    return (s.calls - s.failures) / s.calls if s.calls else 0.0


@dataclass(frozen=True)
class SpendPoint:
    bucket_ms: int
    cost_nano_usd: int


def spend_over_time(client: QueryClient, since_ms: int, until_ms: int) -> list[SpendPoint]:
    """Spend per hour (per minute for windows up to 3 h, per day beyond 7 d): from the rollup of
    that grain when the window falls on it, else from `calls`, so any window is exact."""
    span = until_ms - since_ms
    grain = "minute" if span <= 3 * 3_600_000 else "hour" if span <= 7 * 86_400_000 else "day"
    parameters: dict[str, object] = {"since_ms": since_ms, "until_ms": until_ms}
    step = _GRAIN_MS[grain]
    if since_ms % step == 0 and until_ms % step == 0:
        sql = (
            f"SELECT toUnixTimestamp(bucket) AS b, sum(cost_nano_usd) FROM calls_by_{grain} "  # noqa: S608 - grain is one of three constants
            "WHERE bucket >= toDateTime(intDiv({since_ms:Int64}, 1000), 'UTC') "
            "AND bucket < toDateTime(intDiv({until_ms:Int64}, 1000), 'UTC') "
            "GROUP BY b ORDER BY b"
        )
    else:
        sql = (
            "SELECT toUnixTimestamp(toStartOfInterval(event_time, "  # noqa: S608 - grain is one of three constants
            f"INTERVAL 1 {grain.upper()}, 'UTC')) AS b, "
            "sum(toInt128(cost_nano_usd)) FROM calls "
            "WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
            "AND event_time < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC') "
            "GROUP BY b ORDER BY b"
        )
    result = client.query(sql, parameters)
    return [SpendPoint(int(r[0]) * 1000, int(r[1])) for r in result.rows]


@dataclass(frozen=True)
class Review:
    by: str
    since_ms: int
    until_ms: int
    current: list[Spender]
    previous: dict[str, Spender]
    expensive: list[str]
    remaps: list[Remap]
    total_nano_usd: int
    total_calls: int
    previous_total_nano_usd: int
    series: list[SpendPoint] = field(default_factory=list)
    source: str = "calls"
    escalations: dict[str, Escalations] = field(default_factory=dict)
    previous_escalations: dict[str, Escalations] = field(default_factory=dict)
    budgets: list[BudgetForecast] = field(default_factory=list)

    @property
    def previous_since_ms(self) -> int:
        return max(0, 2 * self.since_ms - self.until_ms)


def _rank(spender: Spender) -> tuple[int, str]:
    return (-spender.cost_nano_usd, spender.key)


def spend_by_key(client: QueryClient, by: str, since_ms: int, until_ms: int) -> dict[str, int]:
    """Spend per key of `by` in the window (rollups when aligned), without latency."""
    totals: dict[str, int] = {}
    for s in key_model_stats(client, by, since_ms, until_ms, latency=False):
        totals[s.key] = totals.get(s.key, 0) + s.cost_nano_usd
    return totals


def _cost_and_tokens(stats: list[KeyModelStats]) -> dict[str, tuple[int, int]]:
    per_model: dict[str, tuple[int, int]] = {}
    for s in stats:
        cost, tokens = per_model.get(s.model, (0, 0))
        per_model[s.model] = (cost + s.cost_nano_usd, tokens + s.tokens)
    return per_model


def build_review(
    client: QueryClient,
    since_ms: int,
    until_ms: int,
    by: str = "agent",
    top: int = 10,
    budgets: list[BudgetLine] | None = None,
) -> Review:
    """The review of [since_ms, until_ms) against [2*since_ms - until_ms, since_ms); with
    `budgets`, the forecast of each at `until_ms`."""
    _check_window(since_ms, until_ms)
    _dimension(by)
    prev_since = max(0, 2 * since_ms - until_ms)
    remap_scopes = ("task_type", "agent")
    now_stats = key_model_stats(client, by, since_ms, until_ms, latency=by in remap_scopes)
    prev_stats = key_model_stats(client, by, prev_since, since_ms, latency=False)
    expensive = expensive_models(now_stats + prev_stats)
    ranked_keys = [
        s.key for s in sorted(_spenders(now_stats, expensive, {}).values(), key=_rank)[:top]
    ]
    now_shape, prev_shape = _structure(client, by, prev_since, since_ms, until_ms, ranked_keys)
    now_escalations, prev_escalations = escalations(
        client,
        DIMENSIONS[by][2],
        prev_since,
        since_ms,
        until_ms,
        ranked_keys,
        model_ranks(_cost_and_tokens(now_stats + prev_stats)),
    )
    current = _spenders(now_stats, expensive, now_shape)
    previous = _spenders(prev_stats, expensive, prev_shape)
    ranked = sorted(current.values(), key=_rank)[:top]
    remaps = []
    for scope_kind in remap_scopes:
        stats = (
            now_stats
            if by == scope_kind
            else key_model_stats(client, scope_kind, since_ms, until_ms)
        )
        remaps.extend(recommend_remaps(stats, scope_kind))
    grain = source_for(since_ms, until_ms)
    return Review(
        by=by,
        since_ms=since_ms,
        until_ms=until_ms,
        current=ranked,
        previous={k: v for k, v in previous.items() if k in {s.key for s in ranked}},
        expensive=sorted(expensive),
        remaps=remaps,
        total_nano_usd=sum(s.cost_nano_usd for s in current.values()),
        total_calls=sum(s.calls for s in current.values()),
        previous_total_nano_usd=sum(s.cost_nano_usd for s in previous.values()),
        series=spend_over_time(client, since_ms, until_ms),
        source=f"{DIMENSIONS[by][0]}_{grain}" if grain else "calls",
        escalations=now_escalations,
        previous_escalations=prev_escalations,
        budgets=forecast_budgets(
            lambda dimension, lo, hi: spend_by_key(client, dimension, lo, hi),
            budgets or [],
            until_ms,
        ),
    )
