"""The real-time dashboard: live spend against budget per scope, burn rate and forecast,
standing commands, recent alerts, spend over time and top agents, in the browser (served by
``python -m agentledger.dashboard``, part of `agentledger up`) and in the terminal
(`agentledger top`); operators stop, throttle or resume scopes from either."""

from __future__ import annotations

from .collector import Collector
from .operator import operator_command, publish_command

__all__ = ["Collector", "operator_command", "publish_command"]
