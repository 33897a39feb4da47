"""smp: the guest starts its APs itself (INIT-SIPI-SIPI through the in-kernel xAPIC), every
vCPU reports a distinct APIC id, and query-cpus shows one real host thread per vCPU."""

from __future__ import annotations

import os
import re

import pytest

pytestmark = pytest.mark.kvm


def _apic_ids(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"^smp: (?:bsp|ap) cpu apic_id=(\d+) lapic_id=\1$", output, re.M)]


@pytest.mark.parametrize("ncpus", [4, 2])
def test_every_vcpu_comes_up_with_its_own_apic_id_and_thread(vm, guest, ncpus):
    v = vm(guest("smp"), "exit=halt", "-smp", str(ncpus))
    v.wait_line(r"^smp: done")
    out = v.output
    assert f"smp: {ncpus} cpus from the MP table" in out
    assert f"smp: done, {ncpus} of {ncpus} cpus up" in out, out
    ids = _apic_ids(out)
    assert len(ids) == ncpus and len(set(ids)) == ncpus, out
    assert "did not start" not in out

    cpus, _ = v.command("query-cpus")
    assert [c["CPU"] for c in cpus] == list(range(ncpus))
    tids = [c["thread_id"] for c in cpus]
    assert len(set(tids)) == ncpus and v.proc.pid not in tids
    tasks = {int(t) for t in os.listdir(f"/proc/{v.proc.pid}/task")}
    assert set(tids) <= tasks
    v.command("quit")
    assert v.wait_exit() == 0


def test_aps_named_on_the_command_line_start_too(vm, guest):
    """cpus=N bypasses the MP table: the guest addresses APIC ids 0..N-1 directly."""
    v = vm(guest("smp"), "cpus=3", "-smp", "3")
    assert v.wait_exit(60) == 0  # the guest resets after its done line
    out = v.output
    assert "smp: 3 cpus from the command line" in out
    assert "smp: done, 3 of 3 cpus up" in out, out
    assert sorted(_apic_ids(out)) == [0, 1, 2]
