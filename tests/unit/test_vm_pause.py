"""VirtualMachine.pause_vcpus: every vCPU is asked and kicked before any is waited for, and the
wait shares one deadline (not one timeout per vCPU)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from application.vm import VirtualMachine
from domain.errors import HypervisorError


class StubRunner:
    def __init__(self, index: int, log: list, parks: bool = True):
        self.index, self._log, self._parks = index, log, parks

    def request_pause(self) -> None:
        self._log.append(("kick", self.index))

    def wait_parked(self, timeout: float) -> bool:
        self._log.append(("wait", self.index))
        self.timeout = timeout
        if not self._parks:
            time.sleep(timeout)
        return self._parks


def test_every_vcpu_is_kicked_before_any_is_waited_for():
    log: list = []
    vm = SimpleNamespace(runners=[StubRunner(i, log) for i in range(4)])
    VirtualMachine.pause_vcpus(vm)
    assert log == [("kick", i) for i in range(4)] + [("wait", i) for i in range(4)]


def test_vcpus_that_do_not_park_are_named_within_one_timeout():
    log: list = []
    runners = [StubRunner(0, log), StubRunner(1, log, parks=False), StubRunner(2, log, parks=False)]
    with pytest.raises(HypervisorError, match=r"\[1, 2\] did not stop"):
        VirtualMachine.pause_vcpus(SimpleNamespace(runners=runners), timeout=0.2)
    # The first stuck vCPU waited out the deadline (it sleeps its whole timeout): none is left.
    assert 0 < runners[1].timeout <= 0.2 and runners[2].timeout == 0.0
