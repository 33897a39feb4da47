"""counter: `stop` freezes the guest (its counter in guest RAM does not move while paused),
`cont` moves it again, with the STOP and RESUME events."""

from __future__ import annotations

import struct
import time

import pytest

pytestmark = pytest.mark.kvm

ADDR = 0x400000


def _counter(v) -> int:
    return struct.unpack("<Q", v.pmem(ADDR, 8))[0]


def _wait_moves(v, since: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _counter(v)
        if now > since:
            return now
        time.sleep(0.02)
    raise AssertionError(f"the counter stayed at {since}")


def test_stop_freezes_the_counter_and_cont_moves_it(vm, guest):
    v = vm(guest("counter"), f"addr={ADDR:#x}")
    v.wait_line(rf"^counter: running at {ADDR:x}$")
    first = _wait_moves(v, 0)
    _wait_moves(v, first)  # running: it keeps moving

    _, events = v.command("stop")
    stop = v.event("STOP", events)
    assert stop["data"] == {}
    status, _ = v.command("query-status")
    assert status["status"] == "paused"  # ("running" stays true while paused, as in the manual)
    a = _counter(v)
    time.sleep(0.2)
    b = _counter(v)
    assert a == b, "the counter moved while the VM was paused"

    _, events = v.command("cont")
    v.event("RESUME", events)
    status, _ = v.command("query-status")
    assert status["status"] == "running"
    c = _wait_moves(v, b)
    assert c > b

    # A second pause/resume cycle behaves the same.
    _, events = v.command("stop")
    v.event("STOP", events)
    a = _counter(v)
    time.sleep(0.2)
    assert _counter(v) == a
    _, events = v.command("cont")
    v.event("RESUME", events)
    _wait_moves(v, a)

    v.command("quit")
    assert v.wait_exit() == 0
