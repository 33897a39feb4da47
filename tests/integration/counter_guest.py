"""The counter test guest (tests/guests): it zeroes a 64-bit counter at ADDR in guest RAM,
prints START_LINE once, then only increments the counter. Helpers to start it and read it."""

from __future__ import annotations

import struct
import time

ADDR = 0x400000
START_LINE = rf"^counter: running at {ADDR:x}$"


def counter(v) -> int:
    return struct.unpack("<Q", v.pmem(ADDR, 8))[0]


def moves_past(v, since: int, timeout: float = 20.0) -> int:
    """Poll the counter until it exceeds ``since`` (the guest runs); its value then."""
    deadline = time.monotonic() + timeout
    while True:
        now = counter(v)
        if now > since:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the counter stayed at {now} (waiting to pass {since})")
        time.sleep(0.02)


def pause_and_resume(v, hold: float = 0.2) -> None:
    """stop (with its STOP event): the counter holds still for ``hold`` seconds; cont (with its
    RESUME event): it moves again."""
    _, events = v.command("stop")
    v.event("STOP", events)
    a = counter(v)
    time.sleep(hold)
    assert counter(v) == a, "the counter moved while the VM was paused"
    _, events = v.command("cont")
    v.event("RESUME", events)
    moves_past(v, a)


def running_counter(vm, guest, *extra, **kw):
    """A counter guest (vm, guest: the integration fixtures) past its start line whose counter
    was seen moving twice."""
    v = vm(guest("counter"), f"addr={ADDR:#x}", *extra, **kw)
    v.wait_line(START_LINE)
    moves_past(v, moves_past(v, 0))
    return v
