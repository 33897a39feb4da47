"""EpollPoller's timers (domain.ports.Timers): heap order, cancel, waking the sleeping loop from
another thread, and a failing callback that must not stop the I/O thread. Waits are bounded
events (a broken poller fails them); nothing here measures how long anything took."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from adapters.host.poller import EpollPoller

WAIT = 10.0  # seconds to give the I/O thread before calling it broken


@pytest.fixture
def poller():
    p = EpollPoller()
    yield p
    p.stop()


def test_due_timers_run_in_deadline_order_then_insertion_order(poller):
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    poller.call_at(now - 1, lambda: ran.append("c"))
    poller.call_at(now - 3, lambda: ran.append("a"))
    poller.call_at(now - 2, lambda: ran.append("b1"))
    poller.call_at(now - 2, lambda: ran.append("b2"))
    poller.call_at(now, done.set)
    poller.start()  # every timer is already due when the loop first looks
    assert done.wait(WAIT)
    assert ran == ["a", "b1", "b2", "c"]


def test_cancelled_timer_does_not_run_and_cancel_is_idempotent(poller):
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    keep = poller.call_at(now - 2, lambda: ran.append("keep"))
    drop = poller.call_at(now - 1, lambda: ran.append("drop"))
    poller.cancel(drop)
    poller.cancel(drop)
    poller.call_at(now, done.set)
    poller.start()
    assert done.wait(WAIT)
    assert ran == ["keep"]
    poller.cancel(keep)  # already ran: nothing to do


def test_many_cancelled_timers_are_compacted_away_and_the_rest_still_run(poller):
    ran: list[int] = []
    done = threading.Event()
    now = time.monotonic()
    handles = [poller.call_at(now + 3600 + i, lambda i=i: ran.append(i)) for i in range(200)]
    for h in handles[:150]:
        poller.cancel(h)
    assert len(poller._timers) < 200  # rebuilt once most of the heap was dead
    poller.call_at(now - 1, lambda: ran.append(-1))
    poller.call_at(now, done.set)
    poller.start()
    assert done.wait(WAIT)
    assert ran == [-1]


def test_a_timer_added_from_another_thread_wakes_the_sleeping_loop(poller):
    poller.start()
    far = threading.Event()
    poller.call_at(time.monotonic() + 3600, far.set)  # the loop now sleeps for an hour
    time.sleep(0.05)  # let it go to sleep on that timeout
    near = threading.Event()
    poller.call_at(time.monotonic(), near.set)
    assert near.wait(WAIT)  # without the wake pipe it would sleep on
    assert not far.is_set()


def test_a_timer_added_to_an_idle_loop_wakes_it(poller):
    poller.start()
    time.sleep(0.05)  # no fd, no timer: the loop sleeps with no timeout at all
    ran = threading.Event()
    poller.call_at(time.monotonic() + 0.01, ran.set)
    assert ran.wait(WAIT)


def test_a_callback_can_rearm_from_the_io_thread(poller):
    count = 0
    done = threading.Event()

    def tick():
        nonlocal count
        count += 1
        if count < 5:
            poller.call_at(time.monotonic() + 0.001, tick)
        else:
            done.set()

    poller.start()
    poller.call_at(time.monotonic(), tick)
    assert done.wait(WAIT)
    assert count == 5


def test_a_raising_callback_does_not_stop_the_loop(poller, caplog):
    def boom():
        raise RuntimeError("device bug")

    after = threading.Event()
    fd_seen = threading.Event()
    now = time.monotonic()
    poller.call_at(now - 1, boom)
    poller.call_at(now, after.set)
    fd = poller.new_eventfd()
    poller.watch(fd, fd_seen.set)
    with caplog.at_level(logging.ERROR, logger="pystrato.io"):
        poller.start()
        assert after.wait(WAIT)
        poller.signal(fd)  # fd callbacks still run too
        assert fd_seen.wait(WAIT)
    assert any("timer callback" in rec.message for rec in caplog.records)
    poller.close_fd(fd)


def test_timeout_follows_the_earliest_live_deadline():
    t = [100.0]
    p = EpollPoller(clock=lambda: t[0])
    assert p._timeout() is None
    late = p.call_at(130.0, lambda: None)
    early = p.call_at(110.0, lambda: None)
    assert p._timeout() == pytest.approx(10.0)
    p.cancel(early)
    assert p._timeout() == pytest.approx(30.0)
    t[0] = 200.0
    assert p._timeout() == 0.0
    assert [timer is late for timer in p._due()] == [True]
    assert p._timeout() is None
