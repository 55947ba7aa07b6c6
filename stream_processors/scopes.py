"""The second hop: costs re-keyed from agent to pool, workflow and task type.

The calls topic is keyed by agent id, so one worker sees all of an agent's events but not all
of a pool's. After counting an event for its agent, the first hop forwards one small record
per other scope (pool, workflow, task type) to ``<prefix>processor-scopes``, keyed by scope;
the second hop sums those per scope.

Exactness of this hop: each record carries the calls partition and offset it came from. A
scope's state keeps the highest calls offset applied per calls partition (one worker forwards
a calls partition in offset order, and a scope key always lands on the same scopes
partition), so a re-sent record, from a replay after a crash, is recognised and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from agentledger.config import Settings
from agentledger.schemas import CallFields
from agentledger.schemas.topic_specs import TopicSpec, topic_specs
from agentledger.topic_admin import ensure_topics

from .tracking import Activity

_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder().decode

__all__ = [
    "MAX_COSTS_PER_RECORD",
    "SCOPES_RETENTION_MS",
    "ScopeCost",
    "changelog_topic_name",
    "decode_scope_costs",
    "encode_scope_costs",
    "ensure_scopes_topic",
    "forwarded_costs",
    "scopes_topic_name",
]

# Costs per forwarded scopes record, to stay far below Kafka's 1 MB message limit.
MAX_COSTS_PER_RECORD = 2000
# Only unprocessed records matter here (a replay of the first hop re-sends them), so the
# retention just has to outlast a long outage of the second hop.
SCOPES_RETENTION_MS = 7 * 24 * 3600 * 1000


def scopes_topic_name(settings: Settings) -> str:
    return f"{settings.topic_prefix}processor-scopes"


@dataclass(frozen=True)
class ScopeCost:
    """One event's cost, forwarded to one non-agent scope."""

    scope: str
    event_id: str
    event_time_ms: int
    cost_nano_usd: int
    partition: int  # of the calls topic
    offset: int  # in that calls partition
    #: Who made the call and for how long: pool and workflow scopes only (concurrency caps,
    #: spawn limits).
    activity: Activity | None = None
    #: The shim process whose allowance the call spent (allowances.py), if any.
    holder: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "scope": self.scope,
                "event_id": self.event_id,
                "event_time_ms": self.event_time_ms,
                "cost_nano_usd": self.cost_nano_usd,
                "partition": self.partition,
                "offset": self.offset,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, value: bytes | None) -> ScopeCost:
        """Parse a forwarded record; raise ValueError naming the bad field."""
        if not value:
            raise ValueError("scope cost record is empty")
        try:
            data: Any = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"scope cost record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("scope cost record must be a JSON object")
        for name in ("scope", "event_id"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"scope cost field {name!r} must be a non-empty string")
        for name in ("event_time_ms", "cost_nano_usd", "partition", "offset"):
            number = data.get(name)
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ValueError(f"scope cost field {name!r} must be an integer >= 0")
        return cls(
            scope=data["scope"],
            event_id=data["event_id"],
            event_time_ms=data["event_time_ms"],
            cost_nano_usd=data["cost_nano_usd"],
            partition=data["partition"],
            offset=data["offset"],
        )


def encode_scope_costs(scope: str, costs: list[ScopeCost]) -> bytes:
    """One record carrying many costs of one scope, in the order they were counted.

    The first hop forwards a whole batch of events this way: one send per scope per batch
    instead of one per event and scope, which is most of the second hop's cost.
    """
    if any(cost.scope != scope for cost in costs):
        raise ValueError(f"every cost in a scope batch must belong to {scope!r}")
    # msgspec writes the same compact JSON as json.dumps, several times faster: this and the
    # decode below were a third of the second hop's time (py-spy, P1).
    return _ENCODE(
        {
            "scope": scope,
            "costs": [
                [
                    c.event_id,
                    c.event_time_ms,
                    c.cost_nano_usd,
                    c.partition,
                    c.offset,
                    *_activity_row(c.activity),
                    *((c.holder,) if c.holder is not None else ()),
                ]
                for c in costs
            ],
        }
    )


def decode_scope_costs(value: bytes | None) -> list[ScopeCost]:
    """Parse a forwarded record, one cost (:meth:`ScopeCost.to_bytes`) or a batch
    (:func:`encode_scope_costs`); raise ValueError naming the bad field."""
    if not value:
        raise ValueError("scope cost record is empty")
    try:
        data: Any = _DECODE(value)
    except msgspec.DecodeError as exc:
        raise ValueError(f"scope cost record is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("scope cost record must be a JSON object")
    if "costs" not in data:
        return [ScopeCost.from_bytes(value)]
    scope = data.get("scope")
    if not isinstance(scope, str) or not scope:
        raise ValueError("scope cost field 'scope' must be a non-empty string")
    rows = data["costs"]
    if not isinstance(rows, list) or not rows:
        raise ValueError("scope cost field 'costs' must be a non-empty list")
    costs = []
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) not in (5, 6, 9, 10):
            raise ValueError(
                f"scope cost field 'costs[{index}]' must be "
                "[event_id, event_time_ms, cost_nano_usd, partition, offset], optionally "
                "followed by [agent_id, parent_agent_id, spawn_depth, latency_ms], then "
                "optionally by the allowance holder"
            )
        holder = None
        if len(row) in (6, 10):
            holder = row[-1]
            if not isinstance(holder, str) or not holder:
                raise ValueError(f"scope cost field 'costs[{index}]': holder must be a string")
            row = row[:-1]
        activity = _activity_of(row[5:], index) if len(row) == 9 else None
        event_id, *numbers = row[:5]
        if not isinstance(event_id, str) or not event_id:
            raise ValueError(f"scope cost field 'costs[{index}][0]' must be a non-empty event id")
        for position, number in enumerate(numbers, start=1):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ValueError(
                    f"scope cost field 'costs[{index}][{position}]' must be an integer >= 0"
                )
        time, nano, partition, offset = numbers
        costs.append(ScopeCost(scope, event_id, time, nano, partition, offset, activity, holder))
    return costs


def _activity_row(activity: Activity | None) -> list[Any]:
    if activity is None:
        return []
    return [
        activity.agent_id,
        activity.parent_agent_id,
        activity.spawn_depth,
        activity.latency_ms,
    ]


def _activity_of(tail: list[Any], index: int) -> Activity:
    agent, parent, depth, latency = tail
    where = f"scope cost field 'costs[{index}]'"
    if not isinstance(agent, str) or not agent:
        raise ValueError(f"{where}: agent_id must be a non-empty string")
    if parent is not None and (not isinstance(parent, str) or not parent):
        raise ValueError(f"{where}: parent_agent_id must be null or a non-empty string")
    for name, number in (("spawn_depth", depth), ("latency_ms", latency)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{where}: {name} must be an integer >= 0")
    return Activity(agent, parent, depth, latency)


def forwarded_costs(
    event: CallFields,
    partition: int,
    offset: int,
    event_id: str | None = None,
    holder: str | None = None,
) -> list[ScopeCost]:
    """The records the first hop forwards for ``event``: one per scope except its agent.
    ``event_id`` is the event's id as hex, when the caller has it already; ``holder`` the
    shim process whose allowances the call spent."""
    if not (event.pool or event.workflow_id or event.task_type):
        return []
    hex_id = event.event_id.hex if event_id is None else event_id
    time, cost = event.event_time_ms, event.cost_nano_usd
    costs = []
    if event.pool or event.workflow_id:
        activity = Activity(
            event.agent_id, event.parent_agent_id, event.spawn_depth, event.latency_ms
        )
        if event.pool:
            costs.append(
                ScopeCost(
                    f"pool:{event.pool}", hex_id, time, cost, partition, offset, activity, holder
                )
            )
        if event.workflow_id:
            scope = f"workflow:{event.workflow_id}"
            costs.append(ScopeCost(scope, hex_id, time, cost, partition, offset, activity, holder))
    if event.task_type:
        scope = f"task_type:{event.task_type}"
        costs.append(ScopeCost(scope, hex_id, time, cost, partition, offset, None, holder))
    return costs


def changelog_topic_name(settings: Settings, table: str) -> str:
    """The name faust gives a table's changelog: ``<app id>-<table>-changelog``."""
    return f"{settings.topic_prefix}processor-{table}-changelog"


def ensure_scopes_topic(settings: Settings, partitions: int, tables: tuple[str, ...]) -> None:
    """Create the scopes topic and the tables' changelogs with explicit config, if missing, and
    wait for their leaders (as ensure_topics does for the stack's topics). All have as many
    partitions as calls.

    faust would create the changelogs itself, but an agent that starts before the new topic
    shows in its metadata fails with PartitionsMismatch (0 partitions) and never recovers.
    """
    specs = [
        TopicSpec(
            scopes_topic_name(settings),
            partitions,
            {"retention.ms": str(SCOPES_RETENTION_MS), "cleanup.policy": "delete"},
        )
    ]
    # The allowance topics too: a stack created before allowances existed lacks them.
    allowance_topics = (settings.topics.allowance_requests, settings.topics.allowances)
    specs += [s for s in topic_specs(settings.topics, partitions) if s.name in allowance_topics]
    specs += [
        TopicSpec(changelog_topic_name(settings, table), partitions, {"cleanup.policy": "compact"})
        for table in tables
    ]
    ensure_topics(settings.kafka, specs, client_config=settings.kafka_client_config())
