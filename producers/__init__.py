"""The in-agent shim: record every LLM call to Kafka and obey the budget STOPs.

```python
from agentledger.producers import Ledger, BudgetExceeded
ledger = Ledger.from_env()
agent = ledger.agent("researcher-1", workflow="wf-1", pool="research")
with agent.call(provider="openai", model="gpt-4o-mini") as call:
    call.record(input_tokens=1200, output_tokens=300)
ledger.close()
```

Light on purpose: imports only confluent-kafka, pydantic, genai-prices and the schemas, and
connects to nothing until the first agent or call.
"""

from .control import ControlState, KafkaControlListener
from .errors import (
    AllowanceRefused,
    BudgetExceeded,
    ControlPlaneUnavailable,
    NewWorkRefused,
    ThrottleTimeout,
    UnpricedModelWarning,
)
from .ledger import (
    AgentLedger,
    AsyncCallRecorder,
    CallRecorder,
    Ledger,
    TaskUnit,
    wall_clock_ms,
)
from .litellm_callback import LedgerCallback, litellm_callback
from .pricing import PRICING_VERSION, Price, PriceOverride, Pricer
from .router import Candidate, Router, RoutingDecision, RoutingPolicy, StatsBook
from .scope import TaskScope, current_task
from .sdk import instrument_anthropic, instrument_openai
from .spool import Spool
from .transport import EventTransport, InMemoryTransport, KafkaTransport, TransportStats

__all__ = [
    "PRICING_VERSION",
    "AgentLedger",
    "AllowanceRefused",
    "AsyncCallRecorder",
    "BudgetExceeded",
    "CallRecorder",
    "Candidate",
    "ControlPlaneUnavailable",
    "ControlState",
    "EventTransport",
    "InMemoryTransport",
    "KafkaControlListener",
    "KafkaTransport",
    "Ledger",
    "LedgerCallback",
    "NewWorkRefused",
    "Price",
    "PriceOverride",
    "Pricer",
    "Router",
    "RoutingDecision",
    "RoutingPolicy",
    "Spool",
    "StatsBook",
    "TaskScope",
    "TaskUnit",
    "ThrottleTimeout",
    "TransportStats",
    "UnpricedModelWarning",
    "current_task",
    "instrument_anthropic",
    "instrument_openai",
    "litellm_callback",
    "wall_clock_ms",
]
