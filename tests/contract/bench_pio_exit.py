"""PIO exit round trip on KVM: a guest loop of `out` instructions against a bare Python loop.

    .venv/bin/python -m tests.contract.bench_pio_exit [count] [runs]

Prints per-iteration costs (min and median over runs): a PIO exit handled in Python
(KVM_RUN -> IoOut -> run again), the bare KVM_RUN call in a loop without decoding the exit (what
the exit itself costs), the same `out` swallowed by an ioeventfd (no exit to Python), and an
empty Python loop of the same count. Not a test: numbers depend on the host.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from adapters.host.memory import MmapAllocator
from adapters.kvm._lib import lib
from adapters.kvm.hypervisor import KvmHypervisor
from domain.vcpu_exit import IoOut
from tests.contract import asm
from tests.contract.asm import ECX
from tests.contract.longmode import enter

PORT = 0x80


def _program(count: int) -> bytes:
    body = asm.out_imm(PORT) + asm.dec_r32(ECX)
    return asm.mov_r32(ECX, count) + body + asm.jnz(-(len(body) + 2)) + asm.HLT


def _guest_loop(hv, count: int, ioeventfd: bool, bare: bool = False) -> float:
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 2 << 20)])
    vm = hv.create_vm()
    efd = os.eventfd(0, os.EFD_NONBLOCK) if ioeventfd else None
    try:
        vm.set_memory_region(0, 0, mem.regions[0].view)
        if efd is not None:
            vm.register_ioevent(efd, PORT, 1, None, True)
        vcpu = vm.create_vcpu(0)
        mem.write(0x4000, _program(count))
        enter(vcpu, mem, "long", 0x4000)
        if bare:
            px_run, fd = lib.px_run, vcpu._fd
            t0 = time.perf_counter()
            for _ in range(count):
                px_run(fd)
            elapsed = time.perf_counter() - t0
            assert type(vcpu.run()) is not IoOut  # all `out`s were executed: at the hlt
            return elapsed / count
        run = vcpu.run
        exits = 0
        t0 = time.perf_counter()
        while type(run()) is IoOut:
            exits += 1
        elapsed = time.perf_counter() - t0
        assert exits == (0 if ioeventfd else count), exits
        return elapsed / count
    finally:
        vm.close()
        alloc.free(mem)
        if efd is not None:
            os.close(efd)


def _python_loop(count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        pass
    return (time.perf_counter() - t0) / count


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv else 20000
    runs = int(argv[1]) if len(argv) > 1 else 5
    hv = KvmHypervisor()
    rows = {
        "PIO exit to Python": [_guest_loop(hv, count, False) for _ in range(runs)],
        "bare KVM_RUN per PIO exit": [_guest_loop(hv, count, False, bare=True) for _ in range(runs)],
        "PIO to ioeventfd (no exit)": [_guest_loop(hv, count, True) for _ in range(runs)],
        "empty Python loop": [_python_loop(count) for _ in range(runs)],
    }
    print(f"{count} iterations, {runs} runs: per iteration, min / median")
    for name, values in rows.items():
        print(f"  {name:28s} {min(values) * 1e6:9.3f} us / {statistics.median(values) * 1e6:9.3f} us")
    hv.close()


if __name__ == "__main__":
    main(sys.argv[1:])
