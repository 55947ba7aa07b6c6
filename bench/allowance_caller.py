"""A shim process for the allowance benchmark and tests: ``python -m bench.allowance_caller``.

Makes gpt-4o-mini calls (``max_tokens=1000``, so $0.0006 reserved each) from ``--threads``
threads as agents of ``--pool`` (or ``--agent``-scoped agents) until refused or ``--seconds``
pass, each taking ``--latency-s`` and using between ``--min-output`` and 1,000 output tokens,
then prints one JSON line: calls made, refusals, nano-USD spent and reserved, the holder id.
With ``--hold`` it makes one call, prints, and sleeps (to be killed holding an allowance).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

from agentledger.producers import BudgetExceeded, Ledger


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--latency-s", type=float, default=0.005)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--min-output", type=int, default=1000)
    parser.add_argument(
        "--allowance-wait-s",
        type=float,
        default=5.0,
        help="how long a call waits for an allowance before going ahead without one (fail-open)",
    )
    args = parser.parse_args()
    ledger = Ledger.from_env(allowance_wait_s=args.allowance_wait_s)
    assert ledger.wait_for_control(60.0), "control and policies not loaded in 60 s"
    made = refused = spent = reserved = excess = 0
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    started = time.monotonic()
    # Calls/s are counted from the first call's end on (the first call waits for a grant, and
    # the process's start is not what the rate is about).
    warm: list[float] = []
    warm_made = 0
    warm_requests = 0
    reasons: list[str] = []

    def caller(index: int) -> None:
        nonlocal made, refused, spent, reserved, excess, warm_made, warm_requests
        agent = ledger.agent(f"{args.name}-{index}", pool=args.pool)
        rng = random.Random(index)  # noqa: S311 - token counts, not secrets
        while time.monotonic() < deadline:
            try:
                with agent.call(provider="openai", model="gpt-4o-mini", max_tokens=1000) as call:
                    time.sleep(args.latency_s)
                    call.record(output_tokens=rng.randint(args.min_output, 1000))
                    held = call.reserved_nano_usd
            except BudgetExceeded as exc:
                with lock:
                    refused += 1
                    reasons.append(str(exc))
                return
            with lock:
                if not warm:
                    warm.append(time.monotonic())
                    warm_made = made + 1
                    assert ledger.allowances is not None
                    warm_requests = ledger.allowances.stats["requests"]
                made += 1
                spent += call.cost_nano_usd
                reserved += held
                excess += max(call.cost_nano_usd - held, 0)
            if args.hold:
                return

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    assert ledger.allowances is not None
    ledger.transport.flush(30)
    print(
        json.dumps(
            {
                "made": made,
                "refused": refused,
                "spent_nano_usd": spent,
                "reserved_nano_usd": reserved,
                "excess_nano_usd": excess,
                "seconds": round(took, 3),
                "calls_per_s_after_first": (
                    round((made - warm_made) / (time.monotonic() - warm[0]), 2)
                    if warm and made > warm_made
                    else 0.0
                ),
                "requests": ledger.allowances.stats["requests"],
                "admitted_unlicensed": ledger.stats["admitted_unlicensed"],
                "refusals": sorted(set(reasons)),
                "requests_after_first": ledger.allowances.stats["requests"] - warm_requests,
                "holder": ledger.allowances.holder,
                "held": ledger.allowances.snapshot(),
            }
        ),
        flush=True,
    )
    if args.hold:
        time.sleep(3600)
    ledger.close()


if __name__ == "__main__":
    main()
