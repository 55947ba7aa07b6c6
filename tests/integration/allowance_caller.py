"""A shim process for the allowance tests: ``python -m tests.integration.allowance_caller``.

Makes gpt-4o-mini calls (1,000 output tokens, $0.0006 each) from ``--threads`` threads as
agents of ``--pool`` until refused, then prints one JSON line: calls made, refusals, and the
holder id. With ``--hold`` it makes one call, prints, and sleeps (to be killed holding an
allowance).
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    ledger = Ledger.from_env()
    assert ledger.wait_for_control(60.0), "control and policies not loaded in 60 s"
    made = refused = 0
    lock = threading.Lock()

    def caller(index: int) -> None:
        nonlocal made, refused
        agent = ledger.agent(f"{args.name}-{index}", pool=args.pool)
        while True:
            try:
                with agent.call(provider="openai", model="gpt-4o-mini", max_tokens=1000) as call:
                    time.sleep(args.latency_s)
                    call.record(output_tokens=1000)
            except BudgetExceeded:
                with lock:
                    refused += 1
                return
            with lock:
                made += 1
            if args.hold:
                return

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.allowances is not None
    ledger.transport.flush(30)
    print(
        json.dumps(
            {
                "made": made,
                "refused": refused,
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
