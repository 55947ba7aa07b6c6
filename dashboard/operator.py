"""Operator commands: STOP, THROTTLE N or RESUME for a scope, signed and published to the
control topic, from the CLI or the dashboard page.

How they meet the processor's own commands: the control topic keeps one command per scope and
the shim obeys the newest (by issued_at_ms). The processor publishes only when its own decision
for a scope changes (a threshold crossed, a period rolled over, a policy edited), so an
operator command stands until an operator replaces it or the processor's decision for that
scope next changes. An operator RESUME therefore lifts a budget STOP for the rest of the
period unless spend crosses another threshold. The sink audits every command in ClickHouse
(`control_commands`, issuer ``operator:<name>``).
"""

from __future__ import annotations

import getpass
import re

from confluent_kafka import KafkaException, Producer

from agentledger.config import Settings
from agentledger.schemas import ControlAction, ControlCommand, sign_command

__all__ = [
    "OPERATOR_ACTIONS",
    "default_operator",
    "operator_command",
    "publish_command",
]

OPERATOR_ACTIONS = ("stop", "throttle", "resume")
_NAME = re.compile(r"^[A-Za-z0-9._@\-]{1,100}$")


def default_operator() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
    return name if _NAME.match(name) else "unknown"


def operator_command(
    *,
    scope: str,
    action: str,
    now_ms: int,
    key: bytes,
    operator: str,
    reason: str | None = None,
    concurrency: int | None = None,
    until_ms: int | None = None,
) -> ControlCommand:
    """A signed command; raises ValueError naming the bad field (pydantic's for the scope)."""
    if action not in OPERATOR_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(OPERATOR_ACTIONS)}, got {action!r}")
    if not _NAME.match(operator):
        raise ValueError(
            f"operator must be 1-100 characters of letters, digits and ._@-, got {operator!r}"
        )
    params: dict[str, str | int] = {}
    if action == "throttle":
        if concurrency is None or concurrency < 1:
            raise ValueError(f"throttle needs concurrency >= 1, got {concurrency!r}")
        params["concurrency"] = concurrency
    elif concurrency is not None:
        raise ValueError(f"concurrency applies to throttle only, not {action}")
    if until_ms is not None and until_ms <= now_ms:
        raise ValueError(f"until_ms {until_ms} must be in the future (now {now_ms})")
    command = ControlCommand(
        # Subtree scopes exist from version 2 on; the rest stay readable by older shims.
        schema_version=2 if scope.startswith("subtree:") else 1,
        scope=scope,
        action=ControlAction(action),
        params=params,
        reason=reason or f"{action} by operator {operator}",
        issued_at_ms=now_ms,
        until_ms=until_ms,
        issuer=f"operator:{operator}",
    )
    return sign_command(command, key)


def publish_command(settings: Settings, command: ControlCommand, timeout_s: float = 10.0) -> None:
    """Produce ``command`` to the control topic, keyed by scope, and wait for the broker's ack.
    Raises RuntimeError when it was not delivered."""
    failures: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    try:
        producer = Producer(
            {
                "bootstrap.servers": settings.kafka,
                "acks": "all",
                "enable.idempotence": True,
                **settings.kafka_client_config(),
            }
        )
        producer.produce(
            settings.topics.control,
            key=command.scope.encode(),
            value=command.model_dump_json().encode(),
            on_delivery=delivered,
        )
        left = producer.flush(timeout_s)
    except KafkaException as exc:
        raise RuntimeError(f"could not publish to {settings.topics.control}: {exc}") from None
    if failures or left:
        why = failures[0] if failures else f"not acknowledged within {timeout_s:.0f} s"
        raise RuntimeError(f"could not publish to {settings.topics.control}: {why}")
