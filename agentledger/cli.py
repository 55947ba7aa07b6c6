"""The `agentledger` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from agentledger.config import Settings
from agentledger.control_cli import add_control_parser
from agentledger.durations import parse_duration_ms
from agentledger.spend_cli import PERIOD_HELP, period_arg, run_spend
from agentledger.tables import render_table
from agentledger.top import add_top_parser

__all__ = ["main", "up_settings"]


def up_settings(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings `up` runs with: its flags over the environment's; and, for a new stack
    given no processor count (no --processors, no AGENTLEDGER_PROCESSORS), one processor per
    core (deploy.stack.default_processors). A running stack keeps the shape it recorded."""
    from agentledger.deploy.stack import Stack, default_processors

    shape = {
        "kafka_brokers": args.brokers,
        "processors": args.processors,
        "sinks": args.sinks,
        "calls_partitions": args.partitions,
    }
    settings = settings.model_copy(update={k: v for k, v in shape.items() if v is not None})
    if "processors" in settings.model_fields_set:
        return settings
    if Stack(settings, progress=lambda _m: None).shape_recorded():
        return settings  # `up` again: the recorded shape holds, unless a count was given
    return settings.model_copy(update={"processors": default_processors(settings.calls_partitions)})


def _cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.deploy.stack import Stack, StackError

    stack = Stack(up_settings(settings, args))
    try:
        rows = stack.up(timeout_s=args.timeout)
    except StackError:
        # A worker that did not come up is just what the supervisor retries: start it anyway
        # once the stack exists (Kafka up, shape recorded), then report the failure.
        if args.supervise and stack.shape_recorded():
            stack.start_supervisor()
        raise
    if args.supervise:
        stack.start_supervisor()
        rows = stack.status()
    _print_status(rows)
    return 0 if all(r.healthy for r in rows) else 1


def _cmd_supervise(settings: Settings, _args: argparse.Namespace) -> int:
    from agentledger.deploy.supervisor import run_supervisor

    return run_supervisor(settings)


def _cmd_down(settings: Settings, _args: argparse.Namespace) -> int:
    from agentledger.deploy.stack import Stack

    stopped = Stack(settings).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.deploy.stack import Stack

    stack = Stack(settings)
    if args.json:
        print(stack.status_json())
        rows = stack.status()
    else:
        rows = stack.status()
        _print_status(rows)
    return 0 if all(r.healthy for r in rows) else 1


def _print_status(rows: Sequence[object]) -> None:
    print(
        render_table(
            ["component", "state", "pid", "address", "log"],
            [
                [r.name, "healthy" if r.healthy else "DOWN", r.pid or "-", r.address, r.log_file]  # type: ignore[attr-defined]
                for r in rows
            ],
        )
    )
    for row in rows:
        for note in getattr(row, "notes", ()):
            print(f"{row.name}: {note}")  # type: ignore[attr-defined]


def _cmd_budgets_apply(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.budgets import apply_policies, load_policy_file

    policies = load_policy_file(Path(args.file))
    count = apply_policies(settings, policies)
    print(f"published {count} budget(s) to {settings.topics.policies}")
    return 0


def _cmd_budgets_list(settings: Settings, _args: argparse.Namespace) -> int:
    from agentledger.budgets import list_policies

    policies = sorted(list_policies(settings), key=lambda p: p.key)
    print(
        render_table(
            ["scope", "period", "limit (USD)"],
            [[p.scope, p.period.value, p.limit_usd] for p in policies],
            right_align=[False, False, True],
        )
    )
    return 0


def _cmd_budgets_diff(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.budgets import diff_policies, list_policies, load_policy_file

    wanted = load_policy_file(Path(args.file))
    changes = diff_policies(list_policies(settings), wanted)
    for change in changes:
        print(change.describe())
    pending = sum(c.change in {"add", "change"} for c in changes)
    print(f"{pending} budget(s) would be published by `agentledger budgets apply {args.file}`")
    return 0


def _cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.review.query import QueryClient

    result = QueryClient.from_settings(settings).query(args.query)
    if args.format == "json":
        print(json.dumps({"columns": result.columns, "rows": result.rows}, default=str))
    else:
        print(render_table(result.columns, result.rows))
    return 0


def _cmd_review(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.review_report import run_review

    # The window ends at the next whole minute so its bounds fall on the rollups' grain (the
    # review then reads the rollups) while still covering every call up to now.
    until_ms = (int(time.time() * 1000) // 60_000 + 1) * 60_000
    since_ms = until_ms - parse_duration_ms(args.since)
    html = Path(args.html) if args.html else None
    from confluent_kafka import KafkaException

    from agentledger.budgets import list_policies

    try:
        policies = list_policies(settings, timeout_s=5.0)
    except (RuntimeError, KafkaException) as exc:
        # The spend review needs only ClickHouse: without the policies it has no forecast.
        print(f"budgets not read, so no forecast: {exc}", file=sys.stderr)
        policies = []
    print(run_review(settings, since_ms, until_ms, by=args.by, html_path=html, policies=policies))
    return 0


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from agentledger.demo import run_demo

    return run_demo(settings, agents=args.agents, budget_usd=args.budget, stop_after=args.down)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 64, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentledger",
        description="Cost governance for multi-agent LLM systems. Settings come from "
        "AGENTLEDGER_* environment variables (see the README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start the local stack (Kafka, processor, sink) in the background"
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for health")
    up.add_argument(
        "--brokers", type=_count, help="Kafka brokers on loopback (3+: replication 3, min ISR 2)"
    )
    up.add_argument(
        "--processors",
        type=_count,
        help="processor workers, one consumer group (default: one per core, at most one per "
        "calls partition)",
    )
    up.add_argument(
        "--sinks", type=_count, help="sink workers; more than 1 needs a ClickHouse server DSN"
    )
    up.add_argument("--partitions", type=_count, help="partitions of a new calls topic")
    up.add_argument(
        "--supervise",
        action="store_true",
        help="also start a background supervisor that restarts a component that exits or "
        "stays unhealthy (`down` stops it first)",
    )
    up.set_defaults(run=_cmd_up)
    sub.add_parser(
        "supervise",
        help="watch the running stack in the foreground and restart a component that exits or "
        "stays unhealthy (Ctrl-C stops watching; the components keep running)",
    ).set_defaults(run=_cmd_supervise)
    sub.add_parser("down", help="stop the local stack").set_defaults(run=_cmd_down)
    status = sub.add_parser("status", help="health, pid, address and log of each component")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=_cmd_status)

    budgets = sub.add_parser("budgets", help="manage budget policies").add_subparsers(
        dest="budgets_command", required=True
    )
    apply = budgets.add_parser("apply", help="publish the budgets of a YAML policy file")
    apply.add_argument("file")
    apply.set_defaults(run=_cmd_budgets_apply)
    budgets.add_parser("list", help="list the published budgets").set_defaults(
        run=_cmd_budgets_list
    )
    diff = budgets.add_parser("diff", help="show what `budgets apply FILE` would change")
    diff.add_argument("file")
    diff.set_defaults(run=_cmd_budgets_diff)

    spend = sub.add_parser(
        "spend", help="live spend, limit, %% used and the standing command of one scope"
    )
    spend.add_argument("scope", help="agent:<id>, pool:<id>, workflow:<id> or task_type:<id>")
    spend.add_argument("--period", type=period_arg, help=PERIOD_HELP)
    spend.add_argument(
        "--json",
        action="store_true",
        help="the processor's report as JSON (with --period: only that period and its buckets)",
    )
    spend.set_defaults(run=run_spend)

    sql = sub.add_parser("sql", help="run a read-only SQL query against the call history")
    sql.add_argument("query")
    sql.add_argument("--format", choices=["table", "json"], default="table")
    sql.set_defaults(run=_cmd_sql)

    review = sub.add_parser(
        "review", help="top spenders, why their spend grew, cheaper models that would do"
    )
    review.add_argument("--since", default="24h", help="how far back, e.g. 24h, 7d (default 24h)")
    review.add_argument(
        "--by",
        choices=["agent", "pool", "workflow", "task_type", "model"],
        default="agent",
        help="rank spenders by this dimension (default agent)",
    )
    review.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    review.set_defaults(run=_cmd_review)

    demo = sub.add_parser("demo", help="run a simulated multi-agent workload with a runaway agent")
    demo.add_argument("--agents", type=int, default=4, help="well-behaved agents (default 4)")
    demo.add_argument("--budget", default="0.25", help="the runaway agent's daily budget in USD")
    demo.add_argument("--down", action="store_true", help="stop the stack afterwards")
    demo.set_defaults(run=_cmd_demo)

    add_top_parser(sub)
    add_control_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    try:
        code: int = args.run(settings, args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        # Expected operational failures (bad input, a component down) print as one clear line;
        # anything else is a bug and keeps its traceback.
        print(f"agentledger: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
