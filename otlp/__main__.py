"""`python -m agentledger.otlp`: the OTLP/HTTP receiver with Settings() from AGENTLEDGER_*."""

from __future__ import annotations

import logging
import sys
import threading

from agentledger.config import Settings

from .service import install_signal_handlers, run_receiver


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    return run_receiver(Settings(), stop)


if __name__ == "__main__":
    sys.exit(main())
