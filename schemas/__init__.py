"""Wire schemas shared by every component. This package imports nothing else from agentledger."""

from .alerts import ALERT_VERSION, Alert, AlertKind, Severity
from .allowance import (
    ALLOWANCE_REQUEST_VERSION,
    ALLOWANCE_VERSION,
    HOLDER_HEADER,
    AllowanceGrant,
    AllowanceKind,
    AllowanceRequest,
    BudgetClaim,
    BudgetGrant,
    sign_grant,
    verify_grant,
)
from .control import (
    CONTROL_COMMAND_VERSION,
    ControlAction,
    ControlCommand,
    SignatureError,
    sign_command,
    subtree_scope,
    verify_command,
)
from .dlq import DEAD_LETTER_VERSION, DeadLetter, InvalidMessage, dead_letter
from .events import CALL_EVENT_VERSION, CallEvent, CallFields, CallStatus, id_hex
from .ids import uuid7
from .money import NANO_PER_USD, format_usd, nano_to_usd, usd_to_nano
from .pause import PAUSE_VERSION, PauseRecord, pause_key
from .policy import (
    BUDGET_POLICY_VERSION,
    BudgetPolicy,
    Period,
    PolicyFile,
    PolicyFileError,
    RetryLoop,
    Spike,
    Threshold,
    parse_policy_file,
)
from .stats import STATS_VERSION, StatsSummary, TaskStats, summarize
from .topic_specs import DEFAULT_CALLS_PARTITIONS, TopicSpec, replication_for, topic_specs
from .topics import Topics

__all__ = [
    "ALERT_VERSION",
    "ALLOWANCE_REQUEST_VERSION",
    "ALLOWANCE_VERSION",
    "BUDGET_POLICY_VERSION",
    "CALL_EVENT_VERSION",
    "CONTROL_COMMAND_VERSION",
    "DEAD_LETTER_VERSION",
    "DEFAULT_CALLS_PARTITIONS",
    "HOLDER_HEADER",
    "NANO_PER_USD",
    "PAUSE_VERSION",
    "STATS_VERSION",
    "Alert",
    "AlertKind",
    "AllowanceGrant",
    "AllowanceKind",
    "AllowanceRequest",
    "BudgetClaim",
    "BudgetGrant",
    "BudgetPolicy",
    "CallEvent",
    "CallFields",
    "CallStatus",
    "ControlAction",
    "ControlCommand",
    "DeadLetter",
    "InvalidMessage",
    "PauseRecord",
    "Period",
    "PolicyFile",
    "PolicyFileError",
    "RetryLoop",
    "Severity",
    "SignatureError",
    "Spike",
    "StatsSummary",
    "TaskStats",
    "Threshold",
    "TopicSpec",
    "Topics",
    "dead_letter",
    "format_usd",
    "id_hex",
    "nano_to_usd",
    "parse_policy_file",
    "pause_key",
    "replication_for",
    "sign_command",
    "sign_grant",
    "subtree_scope",
    "summarize",
    "topic_specs",
    "usd_to_nano",
    "uuid7",
    "verify_command",
    "verify_grant",
]
