"""A durable local spool: events that cannot go to Kafka now are appended to JSONL segments
under ``<home>/spool/<instance>/`` and replayed in order later, keeping their bytes (so their
event ids) unchanged.

Durability: every append is written to the OS before ``append`` returns, so a crash of the
agent process (even ``kill -9``) loses nothing that was spooled; the file is fsynced at most
``fsync_interval_s`` after an append, on segment rotation and on close, so a power loss or OS
crash can lose the spooled events of that last interval. A line torn by such a crash is
skipped (and counted) on replay.

One directory per process, guarded by an ``flock``: a process that finds a sibling directory
whose lock is free (its owner died) adopts and replays it, the oldest first.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import IO

__all__ = ["Spool", "SpooledMessage"]

log = logging.getLogger(__name__)

SpooledMessage = tuple[str, bytes, bytes]
LOCK_NAME = ".lock"


def _encode(topic: str, key: bytes, value: bytes) -> bytes:
    line = {
        "t": topic,
        "k": base64.b64encode(key).decode(),
        "v": base64.b64encode(value).decode(),
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> SpooledMessage:
    raw = json.loads(line)
    return raw["t"], base64.b64decode(raw["k"]), base64.b64decode(raw["v"])


class Spool:
    """Append-only segments; ``take()`` hands out the oldest closed one for replay."""

    def __init__(
        self,
        root: Path,
        *,
        fsync_interval_s: float = 0.1,
        segment_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.root = root
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._lock_file: IO[bytes] | None = None
        self._writer: IO[bytes] | None = None
        self._writer_path: Path | None = None
        self._written = 0
        self._next = 0
        self._last_sync = 0.0
        self._dirty = False
        self.pending = 0
        """records appended (or adopted) and not yet replayed"""
        self.torn_lines = 0

    def _open_dir(self) -> Path:
        # Created on first use, so a Ledger that never spools writes nothing.
        if self._dir is None:
            directory = self.root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            directory.mkdir(parents=True, exist_ok=True)
            lock = (directory / LOCK_NAME).open("ab")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock_file = lock
            self._dir = directory
        return self._dir

    def _others(self) -> list[Path]:
        """The other processes' directories, the one with the oldest segment first (a
        directory's name starts with a pid, which says nothing about age)."""
        if not self.root.is_dir():
            return []
        found: list[tuple[float, str, Path]] = []
        for other in self.root.iterdir():
            if not other.is_dir() or other == self._dir:
                continue
            try:
                oldest = min((s.stat().st_mtime for s in other.glob("*.jsonl")), default=0.0)
            except OSError:  # a segment adopted or replayed meanwhile: order it first
                oldest = 0.0
            found.append((oldest, other.name, other))
        return [path for _, _, path in sorted(found)]

    def has_orphans(self) -> bool:
        """Whether a dead process left segments here. Adopts nothing and creates nothing, so
        a process with nothing to replay writes no directory."""
        for other in self._others():
            if not any(other.glob("*.jsonl")):
                continue
            try:
                with (other / LOCK_NAME).open("rb") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: its owner is alive; or it went meanwhile
                continue
            return True
        return False

    def adopt_orphans(self) -> int:
        """Move the segments of dead processes' spools into this one, oldest first; return how
        many records they hold."""
        if not self.root.is_dir():
            return 0
        adopted = 0
        with self._lock:
            mine = self._open_dir()
            for other in self._others():
                try:
                    with (other / LOCK_NAME).open("ab") as lock:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        for segment in sorted(other.glob("*.jsonl")):
                            target = mine / f"{self._next:010d}.jsonl"
                            self._next += 1
                            segment.rename(target)
                            with target.open("rb") as f:
                                adopted += sum(1 for _ in f)
                        (other / LOCK_NAME).unlink()
                        other.rmdir()
                except BlockingIOError:
                    continue  # its owner is alive
                except OSError as exc:
                    log.warning("agentledger: cannot adopt spool %s: %s", other, exc)
            self.pending += adopted
        if adopted:
            log.warning("agentledger: replaying %d events spooled by an earlier process", adopted)
        return adopted

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        line = _encode(topic, key, value)
        with self._lock:
            if self._writer is None or self._written >= self.segment_bytes:
                self._rotate()
            writer = self._writer
            assert writer is not None
            writer.write(line)
            writer.flush()
            self._written += len(line)
            self.pending += 1
            self._dirty = True
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval_s:
                os.fsync(writer.fileno())
                self._last_sync = now
                self._dirty = False

    def _rotate(self) -> None:
        """Close the current segment (fsynced); the next append opens a new one."""
        if self._writer is not None:
            if self._dirty:
                os.fsync(self._writer.fileno())
                self._dirty = False
            self._writer.close()
            self._writer = None
            self._writer_path = None
        directory = self._open_dir()
        path = directory / f"{self._next:010d}.jsonl"
        self._next += 1
        self._writer = path.open("ab")
        self._writer_path = path
        self._written = 0

    def take(self) -> Path | None:
        """The oldest segment with records, closed for writing; None when the spool is empty."""
        with self._lock:
            if self._dir is None:
                return None
            segments = sorted(self._dir.glob("*.jsonl"))
            if not segments:
                return None
            oldest = segments[0]
            if oldest == self._writer_path:
                if self._written == 0:
                    return None
                self._rotate()
            return oldest

    def load(self, segment: Path) -> tuple[list[SpooledMessage], int]:
        """The records of ``segment`` in order, and its line count (torn lines included)."""
        records: list[SpooledMessage] = []
        lines = 0
        with segment.open("rb") as f:
            for line in f:
                lines += 1
                try:
                    records.append(_decode(line))
                except (ValueError, KeyError, TypeError):
                    self.torn_lines += 1
                    log.warning("agentledger: skipping a torn line in spool segment %s", segment)
        return records, lines

    def done(self, segment: Path, records: int) -> None:
        """Every record of ``segment`` was delivered: delete it."""
        with self._lock:
            segment.unlink()
            self.pending -= records

    def is_empty(self) -> bool:
        with self._lock:
            return self.pending <= 0

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                if self._dirty:
                    os.fsync(self._writer.fileno())
                self._writer.close()
                self._writer = None
                if self._writer_path is not None and self._written == 0:
                    self._writer_path.unlink(missing_ok=True)
                self._writer_path = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
