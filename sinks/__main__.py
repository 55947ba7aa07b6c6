"""`python -m agentledger.sinks`: run the sink with Settings() from AGENTLEDGER_* env vars."""

from __future__ import annotations

import logging
import sys
import threading

from agentledger.config import Settings

from .service import install_signal_handlers, run_sink


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    return run_sink(Settings(), stop)


if __name__ == "__main__":
    sys.exit(main())
