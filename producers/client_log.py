"""librdkafka's own log lines, routed through ``logging`` and rate-limited.

With the broker down, each client the shim makes (the event producer, the control listener's
consumer) logs a "Connect to ... failed: Connection refused" line several times a second, and
with no handler configured Python prints each one to the agent's stderr (156 lines in 10 s
measured). Here every line goes to the ``agentledger.librdkafka`` logger at DEBUG, and at
WARNING an outage is said once per interval, in words the agent's operator can act on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

__all__ = ["DETAIL_LOGGER", "ClientLog", "client_log"]

log = logging.getLogger(__name__)

DETAIL_LOGGER = "agentledger.librdkafka"
"""every librdkafka line, at DEBUG"""

# The causes librdkafka names when it cannot connect (facilities FAIL and ERROR), first match
# wins; "Disconnected" is what a broker stopping under a live connection looks like.
_UNREACHABLE = re.compile(
    r"Connection refused|Connection timed out|timed out|Failed to resolve|No route to host"
    r"|Network is unreachable|Connection reset|Disconnected|brokers are down",
    re.IGNORECASE,
)
# "[thrd:127.0.0.1:9092/bootstrap]: " says which librdkafka thread logged, not what happened.
_THREAD_PREFIX = re.compile(r"^\[thrd:[^\]]*\]:\s*")

UNREACHABLE = "unreachable"


class ClientLog:
    """A confluent-kafka ``logger``: librdkafka calls ``log(level, "%s [%s] %s", facility,
    client name, text)`` from the thread that polls the client.

    Lines below WARNING go only to the detail logger. Of the others, the first of each kind
    (the broker being unreachable, or else librdkafka's facility) in every ``interval_s`` is
    logged by this module's logger, and the rest are counted into the next one.
    """

    INTERVAL_S = 30.0

    def __init__(
        self,
        bootstrap: str,
        *,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap = bootstrap
        self.interval_s = self.INTERVAL_S if interval_s is None else interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._detail = logging.getLogger(DETAIL_LOGGER)
        self.lines = 0
        """librdkafka lines received"""
        self.warnings = 0
        """lines this object logged at WARNING or above"""

    def log(self, level: int, msg: str, *args: object) -> None:
        self.lines += 1  # a statistic: an update lost to a race costs nothing
        self._detail.debug(msg, *args)
        if level < logging.WARNING:
            return
        if len(args) == 3:
            facility, client, text = (str(a) for a in args)
        else:  # not librdkafka's usual shape: keep the whole line
            facility, client, text = "?", "?", msg % args if args else msg
        text = _THREAD_PREFIX.sub("", text)
        cause = _UNREACHABLE.search(text)
        kind = UNREACHABLE if cause is not None else facility
        with self._lock:
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
            self.warnings += 1
        since = (
            f" {suppressed} more such client messages in the last {self.interval_s:.0f} s;"
            if suppressed
            else ""
        )
        if cause is not None:
            log.warning(
                "agentledger: cannot reach Kafka at %s (%s). The agent keeps working: its "
                "events are spooled to disk and sent once a broker answers, and control "
                "commands arrive then. Check that the broker is running and that "
                "AGENTLEDGER_KAFKA names it.%s logger %r at DEBUG shows every client line.",
                self.bootstrap,
                cause.group(0).lower(),
                since,
                DETAIL_LOGGER,
            )
        else:
            log.log(
                level,
                "agentledger: Kafka client %s (%s): %s.%s logger %r at DEBUG shows every "
                "client line.",
                client,
                facility,
                text,
                since,
                DETAIL_LOGGER,
            )


_shared: dict[str, ClientLog] = {}
_shared_lock = threading.Lock()


def client_log(bootstrap: str) -> ClientLog:
    """The process's ``ClientLog`` for ``bootstrap``: the producer and the consumers of one
    process share it, so an outage is said once per interval, not once per client."""
    with _shared_lock:
        found = _shared.get(bootstrap)
        if found is None:
            found = _shared[bootstrap] = ClientLog(bootstrap)
        return found
