"""counter: `stop` freezes the guest (its counter in guest RAM does not move while paused),
`cont` moves it again, with the STOP and RESUME events."""

from __future__ import annotations

import time

import pytest

from tests.integration.counter_guest import counter, moves_past, pause_and_resume, running_counter

pytestmark = pytest.mark.kvm


def test_stop_freezes_the_counter_and_cont_moves_it(vm, guest):
    v = running_counter(vm, guest)  # running: its counter keeps moving

    _, events = v.command("stop")
    stop = v.event("STOP", events)
    assert stop["data"] == {}
    status, _ = v.command("query-status")
    assert status["status"] == "paused"  # ("running" stays true while paused, as in the manual)
    a = counter(v)
    time.sleep(0.2)
    b = counter(v)
    assert a == b, "the counter moved while the VM was paused"

    _, events = v.command("cont")
    v.event("RESUME", events)
    status, _ = v.command("query-status")
    assert status["status"] == "running"
    c = moves_past(v, b)
    assert c > b

    pause_and_resume(v)  # a second pause/resume cycle behaves the same

    v.command("quit")
    assert v.wait_exit() == 0
