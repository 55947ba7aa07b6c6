CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY version
;

CREATE TABLE IF NOT EXISTS calls
(
    schema_version UInt8,
    event_id UUID,
    event_time DateTime64(3, 'UTC'),
    agent_id String,
    pool LowCardinality(Nullable(String)),
    workflow_id Nullable(String),
    parent_agent_id Nullable(String),
    spawn_depth UInt16,
    task_type LowCardinality(Nullable(String)),
    task_id Nullable(String),
    provider LowCardinality(String),
    requested_model LowCardinality(String),
    used_model LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cached_input_tokens UInt64,
    reasoning_tokens UInt64,
    cost_nano_usd Int64,
    priced Bool,
    pricing_version LowCardinality(Nullable(String)),
    latency_ms UInt32,
    status LowCardinality(String),
    attempt UInt16,
    error_type Nullable(String),
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_source_offset _offset TYPE minmax GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (agent_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000
;

ALTER TABLE calls ADD INDEX IF NOT EXISTS idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1
;

CREATE TABLE IF NOT EXISTS control_commands
(
    schema_version UInt8,
    command_id UUID,
    issued_at DateTime64(3, 'UTC'),
    scope String,
    action LowCardinality(String),
    params String,
    reason String,
    limit_nano_usd Nullable(Int64),
    spend_nano_usd Nullable(Int64),
    period_start Nullable(DateTime64(3, 'UTC')),
    until Nullable(DateTime64(3, 'UTC')),
    issuer LowCardinality(String),
    signature Nullable(String),
    verified Bool,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_source_offset _offset TYPE minmax GRANULARITY 1,
    INDEX idx_command_id command_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (scope, issued_at, command_id)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE TABLE IF NOT EXISTS alerts
(
    schema_version UInt8,
    alert_id UUID,
    issued_at DateTime64(3, 'UTC'),
    kind LowCardinality(String),
    severity LowCardinality(String),
    scope String,
    message String,
    period_start Nullable(DateTime64(3, 'UTC')),
    spend_nano_usd Nullable(Int64),
    limit_nano_usd Nullable(Int64),
    action Nullable(String),
    details String,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_source_offset _offset TYPE minmax GRANULARITY 1,
    INDEX idx_alert_id alert_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (scope, issued_at, alert_id)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE TABLE IF NOT EXISTS calls_by_minute
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    workflow_id String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, workflow_id, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_minute_mv TO calls_by_minute AS
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(workflow_id, '') AS workflow_id,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, agent_id, used_model, pool, workflow_id, task_type
;

INSERT INTO calls_by_minute
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(workflow_id, '') AS workflow_id,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM calls_by_minute) = 0
GROUP BY bucket, agent_id, used_model, pool, workflow_id, task_type
;

CREATE TABLE IF NOT EXISTS calls_by_hour
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    workflow_id String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, workflow_id, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_hour_mv TO calls_by_hour AS
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(workflow_id, '') AS workflow_id,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, agent_id, used_model, pool, workflow_id, task_type
;

INSERT INTO calls_by_hour
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(workflow_id, '') AS workflow_id,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM calls_by_hour) = 0
GROUP BY bucket, agent_id, used_model, pool, workflow_id, task_type
;

CREATE TABLE IF NOT EXISTS calls_by_day
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    workflow_id String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, workflow_id, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_day_mv TO calls_by_day AS
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(workflow_id, '') AS workflow_id,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, agent_id, used_model, pool, workflow_id, task_type
;

INSERT INTO calls_by_day
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(workflow_id, '') AS workflow_id,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM calls_by_day) = 0
GROUP BY bucket, agent_id, used_model, pool, workflow_id, task_type
;

DROP VIEW IF EXISTS calls_by_minute_mv
;

DROP TABLE IF EXISTS calls_by_minute
;

DROP VIEW IF EXISTS calls_by_hour_mv
;

DROP TABLE IF EXISTS calls_by_hour
;

DROP VIEW IF EXISTS calls_by_day_mv
;

DROP TABLE IF EXISTS calls_by_day
;

CREATE TABLE IF NOT EXISTS calls_by_minute
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_minute_mv TO calls_by_minute AS
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, agent_id, used_model, pool, task_type
;

INSERT INTO calls_by_minute
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM calls_by_minute) = 0
GROUP BY bucket, agent_id, used_model, pool, task_type
;

CREATE TABLE IF NOT EXISTS calls_by_hour
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_hour_mv TO calls_by_hour AS
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, agent_id, used_model, pool, task_type
;

INSERT INTO calls_by_hour
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM calls_by_hour) = 0
GROUP BY bucket, agent_id, used_model, pool, task_type
;

CREATE TABLE IF NOT EXISTS calls_by_day
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_day_mv TO calls_by_day AS
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, agent_id, used_model, pool, task_type
;

INSERT INTO calls_by_day
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM calls_by_day) = 0
GROUP BY bucket, agent_id, used_model, pool, task_type
;

CREATE TABLE IF NOT EXISTS workflows_by_minute
(
    bucket DateTime('UTC'),
    workflow_id String,
    used_model LowCardinality(String),
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, workflow_id, used_model)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_minute_mv TO workflows_by_minute AS
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, workflow_id, used_model
;

INSERT INTO workflows_by_minute
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM workflows_by_minute) = 0
GROUP BY bucket, workflow_id, used_model
;

CREATE TABLE IF NOT EXISTS workflows_by_hour
(
    bucket DateTime('UTC'),
    workflow_id String,
    used_model LowCardinality(String),
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, workflow_id, used_model)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_hour_mv TO workflows_by_hour AS
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, workflow_id, used_model
;

INSERT INTO workflows_by_hour
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM workflows_by_hour) = 0
GROUP BY bucket, workflow_id, used_model
;

CREATE TABLE IF NOT EXISTS workflows_by_day
(
    bucket DateTime('UTC'),
    workflow_id String,
    used_model LowCardinality(String),
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), UInt32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, workflow_id, used_model)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_day_mv TO workflows_by_day AS
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls

GROUP BY bucket, workflow_id, used_model
;

INSERT INTO workflows_by_day
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    quantilesState(0.5, 0.9, 0.99)(latency_ms) AS latency_ms
FROM calls
WHERE (SELECT count() FROM workflows_by_day) = 0
GROUP BY bucket, workflow_id, used_model
;

DROP VIEW IF EXISTS calls_by_minute_mv
;

DROP TABLE IF EXISTS calls_by_minute
;

DROP VIEW IF EXISTS calls_by_hour_mv
;

DROP TABLE IF EXISTS calls_by_hour
;

DROP VIEW IF EXISTS calls_by_day_mv
;

DROP TABLE IF EXISTS calls_by_day
;

DROP VIEW IF EXISTS workflows_by_minute_mv
;

DROP TABLE IF EXISTS workflows_by_minute
;

DROP VIEW IF EXISTS workflows_by_hour_mv
;

DROP TABLE IF EXISTS workflows_by_hour
;

DROP VIEW IF EXISTS workflows_by_day_mv
;

DROP TABLE IF EXISTS workflows_by_day
;

CREATE TABLE IF NOT EXISTS calls_by_minute
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_minute_mv TO calls_by_minute AS
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls

GROUP BY bucket, agent_id, used_model, pool, task_type
;

INSERT INTO calls_by_minute
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls
WHERE (SELECT count() FROM calls_by_minute) = 0
GROUP BY bucket, agent_id, used_model, pool, task_type
;

CREATE TABLE IF NOT EXISTS calls_by_hour
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_hour_mv TO calls_by_hour AS
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls

GROUP BY bucket, agent_id, used_model, pool, task_type
;

INSERT INTO calls_by_hour
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls
WHERE (SELECT count() FROM calls_by_hour) = 0
GROUP BY bucket, agent_id, used_model, pool, task_type
;

CREATE TABLE IF NOT EXISTS calls_by_day
(
    bucket DateTime('UTC'),
    agent_id String,
    used_model LowCardinality(String),
    pool String,
    task_type String,
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, agent_id, used_model, pool, task_type)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_day_mv TO calls_by_day AS
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls

GROUP BY bucket, agent_id, used_model, pool, task_type
;

INSERT INTO calls_by_day
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    agent_id,
    used_model,
    ifNull(pool, '') AS pool,
    ifNull(task_type, '') AS task_type,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls
WHERE (SELECT count() FROM calls_by_day) = 0
GROUP BY bucket, agent_id, used_model, pool, task_type
;

CREATE TABLE IF NOT EXISTS workflows_by_minute
(
    bucket DateTime('UTC'),
    workflow_id String,
    used_model LowCardinality(String),
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, workflow_id, used_model)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_minute_mv TO workflows_by_minute AS
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls

GROUP BY bucket, workflow_id, used_model
;

INSERT INTO workflows_by_minute
SELECT
    toStartOfMinute(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls
WHERE (SELECT count() FROM workflows_by_minute) = 0
GROUP BY bucket, workflow_id, used_model
;

CREATE TABLE IF NOT EXISTS workflows_by_hour
(
    bucket DateTime('UTC'),
    workflow_id String,
    used_model LowCardinality(String),
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, workflow_id, used_model)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_hour_mv TO workflows_by_hour AS
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls

GROUP BY bucket, workflow_id, used_model
;

INSERT INTO workflows_by_hour
SELECT
    toStartOfHour(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls
WHERE (SELECT count() FROM workflows_by_hour) = 0
GROUP BY bucket, workflow_id, used_model
;

CREATE TABLE IF NOT EXISTS workflows_by_day
(
    bucket DateTime('UTC'),
    workflow_id String,
    used_model LowCardinality(String),
    calls SimpleAggregateFunction(sum, UInt64),
    failures SimpleAggregateFunction(sum, UInt64),
    retries SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_nano_usd SimpleAggregateFunction(sum, Int128),
    failed_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    retry_cost_nano_usd SimpleAggregateFunction(sum, Int128),
    latency_hist SimpleAggregateFunction(sumMap, Map(UInt16, UInt64))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, workflow_id, used_model)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_day_mv TO workflows_by_day AS
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls

GROUP BY bucket, workflow_id, used_model
;

INSERT INTO workflows_by_day
SELECT
    toStartOfDay(event_time, 'UTC') AS bucket,
    ifNull(workflow_id, '') AS workflow_id,
    used_model,
    toUInt64(count()) AS calls,
    toUInt64(countIf(status != 'ok')) AS failures,
    toUInt64(countIf(attempt > 1)) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(toInt128(cost_nano_usd)) AS cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), status != 'ok') AS failed_cost_nano_usd,
    sumIf(toInt128(calls.cost_nano_usd), attempt > 1) AS retry_cost_nano_usd,
    sumMap(map(toUInt16(floor(log2(latency_ms + 1) * 8)), toUInt64(1))) AS latency_hist
FROM calls
WHERE (SELECT count() FROM workflows_by_day) = 0
GROUP BY bucket, workflow_id, used_model
;

CREATE TABLE IF NOT EXISTS task_calls
(
    agent_id String,
    pool LowCardinality(Nullable(String)),
    workflow_id Nullable(String),
    task_type LowCardinality(Nullable(String)),
    task_id String,
    attempt UInt16,
    event_time DateTime64(3, 'UTC'),
    event_id UUID,
    used_model LowCardinality(String),
    status LowCardinality(String),
    cost_nano_usd Int64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (agent_id, task_id, attempt, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000
;

CREATE MATERIALIZED VIEW IF NOT EXISTS task_calls_mv TO task_calls AS
SELECT agent_id, pool, workflow_id, task_type, assumeNotNull(task_id) AS task_id, attempt, event_time, event_id, used_model, status, cost_nano_usd
FROM calls
WHERE calls.task_id IS NOT NULL
;

INSERT INTO task_calls
SELECT agent_id, pool, workflow_id, task_type, assumeNotNull(task_id) AS task_id, attempt, event_time, event_id, used_model, status, cost_nano_usd
FROM calls
WHERE calls.task_id IS NOT NULL AND (SELECT count() FROM task_calls) = 0
;

DROP VIEW IF EXISTS calls_by_hour_mv
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_hour_mv TO calls_by_hour AS
SELECT toStartOfHour(bucket, 'UTC') AS bucket, agent_id, used_model, pool, task_type, sum(calls) AS calls, sum(failures) AS failures, sum(retries) AS retries, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cost_nano_usd) AS cost_nano_usd, sum(failed_cost_nano_usd) AS failed_cost_nano_usd, sum(retry_cost_nano_usd) AS retry_cost_nano_usd, sumMap(latency_hist) AS latency_hist
FROM calls_by_minute
GROUP BY bucket, agent_id, used_model, pool, task_type
;

DROP VIEW IF EXISTS calls_by_day_mv
;

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_by_day_mv TO calls_by_day AS
SELECT toStartOfDay(bucket, 'UTC') AS bucket, agent_id, used_model, pool, task_type, sum(calls) AS calls, sum(failures) AS failures, sum(retries) AS retries, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cost_nano_usd) AS cost_nano_usd, sum(failed_cost_nano_usd) AS failed_cost_nano_usd, sum(retry_cost_nano_usd) AS retry_cost_nano_usd, sumMap(latency_hist) AS latency_hist
FROM calls_by_hour
GROUP BY bucket, agent_id, used_model, pool, task_type
;

DROP VIEW IF EXISTS workflows_by_hour_mv
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_hour_mv TO workflows_by_hour AS
SELECT toStartOfHour(bucket, 'UTC') AS bucket, workflow_id, used_model, sum(calls) AS calls, sum(failures) AS failures, sum(retries) AS retries, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cost_nano_usd) AS cost_nano_usd, sum(failed_cost_nano_usd) AS failed_cost_nano_usd, sum(retry_cost_nano_usd) AS retry_cost_nano_usd, sumMap(latency_hist) AS latency_hist
FROM workflows_by_minute
GROUP BY bucket, workflow_id, used_model
;

DROP VIEW IF EXISTS workflows_by_day_mv
;

CREATE MATERIALIZED VIEW IF NOT EXISTS workflows_by_day_mv TO workflows_by_day AS
SELECT toStartOfDay(bucket, 'UTC') AS bucket, workflow_id, used_model, sum(calls) AS calls, sum(failures) AS failures, sum(retries) AS retries, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cost_nano_usd) AS cost_nano_usd, sum(failed_cost_nano_usd) AS failed_cost_nano_usd, sum(retry_cost_nano_usd) AS retry_cost_nano_usd, sumMap(latency_hist) AS latency_hist
FROM workflows_by_hour
GROUP BY bucket, workflow_id, used_model
;

