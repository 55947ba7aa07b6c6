"""`python -m tests.integration.rebuild_sink`: the sink process (`python -m agentledger.sinks`)
with a rebuild of the rollups appended to its migrations, as version REBUILD_VERSION."""

from __future__ import annotations

import logging
import sys
import threading

from agentledger.config import Settings
from agentledger.sinks.migrations import MIGRATIONS, rebuild_rollups
from agentledger.sinks.service import install_signal_handlers, run_sink

REBUILD_VERSION = 9001


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    return run_sink(Settings(), stop, (*MIGRATIONS, rebuild_rollups(REBUILD_VERSION)))


if __name__ == "__main__":
    sys.exit(main())
