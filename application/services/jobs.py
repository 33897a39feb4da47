"""How a snapshot write and an outgoing live migration run: on one worker thread, off the QMP
event loop, one job per VM at a time.

The QMP side and the worker share only the MigrationState: `migrate` validates, enters setup and
starts the worker; query-migrate reads the status and the figures the worker pushes; migrate_cancel
asks for a cancel there and the worker notices it between two chunks of work. The worker always
ends the job with a terminal status.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from domain.errors import VmmError
from domain.migration import MigrationState

_log = logging.getLogger("pystrato.migration")


class Cancelled(Exception):
    """Raised inside a worker when it notices a cancel request."""


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class JobRunner:
    def __init__(self, state: MigrationState, log: logging.Logger | None = None):
        self._state = state
        self._log = log or _log
        self._thread: threading.Thread | None = None

    def start(self, kind: str, name: str, body: Callable[[], None],
              prepare: Callable[[], None] | None = None) -> None:
        """Enter setup (refused while another job runs), run ``prepare`` on the caller's thread
        (what must hold before `migrate` returns, e.g. the run state that refuses `cont`; an
        error there fails the job and is raised to the caller), then ``body`` on a worker."""
        self._state.begin(kind)
        if prepare is not None:
            try:
                prepare()
            except VmmError as e:
                self._state.fail(str(e))
                raise
        t = threading.Thread(target=self._run, args=(body,), name=name, daemon=True)
        self._thread = t
        t.start()

    def _run(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as e:  # the body ends the job itself; this is the safety net
            self._log.exception("background job crashed")
            self._state.fail(f"internal error: {type(e).__name__}: {e}")

    def check_cancel(self) -> None:
        if self._state.cancel_requested:
            raise Cancelled()

    def wait(self, timeout: float | None = None) -> bool:
        """Join the worker (tests, shutdown). True when no worker is running."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True


class Progress:
    """A worker's progress; pushes QEMU-style figures into MigrationState and, once per
    ``interval``, a line into the log."""

    def __init__(self, state: MigrationState, clock: Callable[[], float], log: logging.Logger,
                 interval: float, what: str = "migration"):
        self.state, self.clock, self.log, self.interval, self.what = state, clock, log, interval, what
        self.t_start = clock()
        self.t_active = self.t_start
        self.t_logged = self.t_start
        self.transferred = 0
        self.remaining = 0
        self.normal = 0
        self.duplicate = 0
        self.rounds = 0
        self.dirty_rate = 0
        self.expected_downtime = 0

    def activated(self, total: int) -> None:
        """The job went active: figures count from now."""
        self.t_active = self.clock()
        self.state.update(setup_time=ms(self.t_active - self.t_start), total=total)

    def bandwidth(self) -> float:
        """Bytes per second since the transfer began (inf until anything was measurable)."""
        dt = self.clock() - self.t_active
        return self.transferred / dt if dt > 0 and self.transferred else float("inf")

    def push(self) -> None:
        now = self.clock()
        dt = now - self.t_active
        mbps = self.transferred * 8 / 1e6 / dt if dt > 0 else 0.0
        self.state.update(
            transferred=self.transferred, remaining=self.remaining, normal=self.normal,
            duplicate=self.duplicate, dirty_sync_count=self.rounds,
            dirty_pages_rate=self.dirty_rate, mbps=mbps,
            expected_downtime=self.expected_downtime, total_time=ms(now - self.t_start))
        if now - self.t_logged >= self.interval:
            self.t_logged = now
            self.log.info(
                "%s: round %d, %d MiB sent, %d MiB remaining, %.0f Mbps, dirty rate %d pages/s",
                self.what, self.rounds, self.transferred >> 20, self.remaining >> 20, mbps,
                self.dirty_rate)


def default_clock() -> float:
    return time.monotonic()
