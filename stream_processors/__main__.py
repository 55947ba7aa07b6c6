"""`python -m agentledger.stream_processors`: run one processor worker with Settings() from env."""

from __future__ import annotations

import logging
import sys

import faust
from confluent_kafka import KafkaException

from agentledger.config import Settings
from agentledger.gc_pauses import GcPauses, tune_gc
from agentledger.metrics import metrics_listener

from .app import build_app
from .declare import TopicMissing

# Exit code of a worker that could not reach Kafka (or found no calls topic) before starting.
EXIT_NO_KAFKA = 3


def main() -> None:
    settings = Settings()
    # faust creates its data dir on start, but not its parents.
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        app = build_app(settings)
    except (KafkaException, TopicMissing) as exc:
        # Kafka unreachable (or the calls topic missing) before faust starts: one line that says
        # what to do instead of a traceback, and a non-zero exit for the supervisor.
        print(
            f"processor: cannot start: {exc}. Check that Kafka answers at {settings.kafka} "
            "(`agentledger status`) and that the stack's topics exist (`agentledger up` "
            "creates them); `agentledger up --supervise` restarts this worker by itself",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_NO_KAFKA)
    # Only when AGENTLEDGER_METRICS_PORT is set; a daemon thread, ended with the process.
    metrics_listener(settings, app.processor.metrics.registry)  # type: ignore[attr-defined]
    # faust's Worker installs SIGTERM/SIGINT handlers that stop the app cleanly.
    # Full collections of the default thresholds held the data plane 60-110 ms each at 10k
    # events/s (P2's outliers); see gc_pauses.py.
    tune_gc()
    GcPauses(logging.getLogger("agentledger.gc")).install()
    worker = faust.Worker(app, loglevel=settings.log_level)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
