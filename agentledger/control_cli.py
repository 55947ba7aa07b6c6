"""`agentledger control stop|throttle N|resume SCOPE`: signed operator commands.

See agentledger.dashboard.operator for how they meet the processor's own commands.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agentledger.config import Settings
from agentledger.durations import parse_duration_ms

__all__ = ["add_control_parser", "run_control"]


def run_control(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.dashboard.operator import operator_command, publish_command

    now_ms = time.time_ns() // 1_000_000
    until_ms = now_ms + parse_duration_ms(args.duration) if args.duration else None
    command = operator_command(
        scope=args.scope,
        action=args.control_action,
        now_ms=now_ms,
        key=settings.control_key_bytes(),
        operator=args.operator,
        reason=args.reason,
        concurrency=getattr(args, "concurrency", None),
        until_ms=until_ms,
    )
    publish_command(settings, command)
    params = " ".join(f"{k}={v}" for k, v in sorted(command.params.items()))
    lapse = (
        time.strftime(" until %Y-%m-%d %H:%M:%SZ", time.gmtime(until_ms / 1000))
        if until_ms is not None
        else ""
    )
    print(
        f"published {command.action.value.upper()}{' ' + params if params else ''} for "
        f"{command.scope}{lapse} as {command.issuer} (command {command.command_id}) to "
        f"{settings.topics.control}; the sink audits it in control_commands"
    )
    return 0


def _common(parser: argparse.ArgumentParser, default_operator: str) -> None:
    parser.add_argument(
        "scope",
        help="agent:<id>, pool:<id>, workflow:<id>, task_type:<id>, or "
        "'subtree:<workflow>|<agent>' (the agents <agent> spawned in that workflow)",
    )
    parser.add_argument("--reason", help="why (kept with the command and in the audit)")
    parser.add_argument(
        "--operator",
        default=default_operator,
        help=f"who is acting, recorded as issuer operator:<name> (default {default_operator})",
    )


def add_control_parser(sub: Any) -> None:
    """Register `control` on the CLI's subparsers (``sub`` is argparse's subparsers action)."""
    from agentledger.dashboard.operator import default_operator

    me = default_operator()
    control = sub.add_parser(
        "control", help="stop, throttle or resume a scope now (signed operator command)"
    ).add_subparsers(dest="control_action", required=True)
    stop = control.add_parser("stop", help="refuse every call of the scope's agents")
    _common(stop, me)
    stop.add_argument(
        "--for",
        dest="duration",
        help="lapse after this long (e.g. 30m, 2h); default: until "
        "resumed or the processor decides otherwise",
    )
    throttle = control.add_parser("throttle", help="at most N concurrent calls in the scope")
    throttle.add_argument("concurrency", type=int, metavar="N")
    _common(throttle, me)
    throttle.add_argument("--for", dest="duration", help="lapse after this long (e.g. 30m)")
    resume = control.add_parser("resume", help="lift what stands for the scope")
    _common(resume, me)
    resume.set_defaults(duration=None)
    for parser in (stop, throttle, resume):
        parser.set_defaults(run=run_control)
