"""kick(): immediate-exit semantics, from another thread, on a busy or an idle guest."""

from __future__ import annotations

import threading
import time

from domain.vcpu_exit import Interrupted, IoIn, IoOut
from tests.contract import asm

JOIN = 30  # seconds: generous, only to turn a hang into a failure


def wait_until_running(machine, thread) -> None:
    """Until the vCPU thread has entered run(); then a little longer so it is inside the guest."""
    for _ in range(1000):
        if machine.vcpu.thread_id() == thread.native_id:
            break
        time.sleep(0.005)
    time.sleep(0.1)


def test_kick_interrupts_a_spinning_guest(machine):
    machine.load(asm.JMP_SELF)
    thread, result = machine.run_in_thread()
    wait_until_running(machine, thread)
    machine.vcpu.kick()
    thread.join(JOIN)
    assert not thread.is_alive()
    assert type(result[0]) is Interrupted
    assert machine.vcpu.thread_id() == thread.native_id


def test_kick_before_run_makes_every_run_return_until_cleared(machine):
    machine.load(asm.mov_al(7) + asm.out_imm(0x80) + asm.HLT)
    vcpu = machine.vcpu
    vcpu.kick()
    assert type(vcpu.run()) is Interrupted
    assert type(vcpu.run()) is Interrupted
    vcpu.clear_kick()
    exit_ = vcpu.run()
    assert type(exit_) is IoOut and bytes(exit_.data) == b"\x07"


def test_hlt_with_irqchip_waits_in_the_hypervisor_until_kicked(machine_irqchip):
    m = machine_irqchip
    m.load(asm.HLT)
    thread, result = m.run_in_thread()
    wait_until_running(m, thread)
    m.vcpu.kick()
    thread.join(JOIN)
    assert type(result[0]) is Interrupted


def test_a_kicked_run_still_completes_the_pending_in(machine):
    # What pause-before-snapshot relies on: KVM finishes the IN with the data we wrote.
    machine.load(asm.in_imm(0x60) + asm.out_imm(0x61) + asm.HLT)
    vcpu = machine.vcpu
    exit_ = vcpu.run()
    assert type(exit_) is IoIn
    exit_.data[0] = 0x42
    vcpu.kick()
    assert type(vcpu.run()) is Interrupted
    assert vcpu.get_regs().rax & 0xFF == 0x42
    vcpu.clear_kick()
    exit_ = vcpu.run()
    assert type(exit_) is IoOut and exit_.port == 0x61 and bytes(exit_.data) == b"\x42"


def test_thread_id_is_none_before_the_first_run(machine):
    assert machine.vcpu.thread_id() is None
    machine.load(asm.HLT)
    seen = []
    t = threading.Thread(target=lambda: (machine.vcpu.run(), seen.append(threading.get_native_id())))
    t.start()
    t.join(JOIN)
    assert machine.vcpu.thread_id() == seen[0]
