import struct

import pytest

from domain.boot import layout
from domain.boot.errors import BootError
from domain.boot.mptable import build_mptable, mptable_size, setup_mptable
from domain.memory import GuestMemory


def parse(mem):
    base = layout.MPTABLE_START
    mpf = mem.read(base, 16)
    assert mpf[:4] == b"_MP_"
    assert sum(mpf) & 0xFF == 0
    physptr, length, spec = struct.unpack_from("<IBB", mpf, 4)
    assert length == 1 and spec == 4
    hdr = mem.read(physptr, 44)
    assert hdr[:4] == b"PCMP"
    table_len, = struct.unpack_from("<H", hdr, 4)
    table = mem.read(physptr, table_len)
    assert sum(table) & 0xFF == 0
    lapic, = struct.unpack_from("<I", hdr, 36)
    count, = struct.unpack_from("<H", hdr, 34)
    entries, off = [], 44
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    while off < table_len:
        t = table[off]
        entries.append(table[off:off + sizes[t]])
        off += sizes[t]
    assert off == table_len and count == len(entries)
    return lapic, entries


@pytest.mark.parametrize("cpus", [1, 2, 4, 254])
def test_mptable_lists_cpus_ioapic_and_interrupts_with_valid_checksums(cpus):
    mem = GuestMemory([(0, bytearray(1 << 20))])
    size = setup_mptable(mem, cpus)
    assert size == mptable_size(cpus)
    lapic, entries = parse(mem)
    assert lapic == layout.LAPIC_START
    procs = [e for e in entries if e[0] == 0]
    assert [p[1] for p in procs] == list(range(cpus))  # APIC ids
    assert all(p[3] & 1 for p in procs)  # enabled
    assert [bool(p[3] & 2) for p in procs] == [True] + [False] * (cpus - 1)  # BSP flag on cpu 0
    ioapics = [e for e in entries if e[0] == 2]
    assert len(ioapics) == 1
    ioapic_id = ioapics[0][1]
    assert ioapic_id not in range(cpus) and ioapic_id < 255
    assert struct.unpack_from("<I", ioapics[0], 4)[0] == layout.IOAPIC_START
    assert [e for e in entries if e[0] == 1] == [bytes([1, 0]) + b"ISA   "]
    intsrc = [e for e in entries if e[0] == 3]
    assert [(e[5], e[6], e[7]) for e in intsrc] == [(irq, ioapic_id, irq) for irq in range(24)]
    lint = [e for e in entries if e[0] == 4]
    assert [(e[1], e[6], e[7]) for e in lint] == [(3, 0, 0), (1, 0xFF, 1)]  # ExtINT->LINT0, NMI->LINT1


def test_mptable_disabled_hotplug_slots():
    mem = GuestMemory([(0, bytearray(1 << 20))])
    setup_mptable(mem, 2, 4)
    _, entries = parse(mem)
    flags = [e[3] for e in entries if e[0] == 0]
    assert flags == [3, 1, 0, 0]


def test_mptable_refusals():
    with pytest.raises(BootError):
        build_mptable(0)
    with pytest.raises(BootError):
        build_mptable(255)
    with pytest.raises(BootError):
        build_mptable(4, 2)
    small = GuestMemory([(0, bytearray(0x9F000))])
    with pytest.raises(BootError, match="too small"):
        setup_mptable(small, 1)
