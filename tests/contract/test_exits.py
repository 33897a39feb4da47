"""I/O and MMIO exits: what the guest did, and the in-place data protocol of KVM's kvm_run."""

from __future__ import annotations

import pytest

from domain.vcpu_exit import Hlt, IoIn, IoOut, MmioRead, MmioWrite
from tests.contract import asm
from tests.contract.asm import EAX, EBX, ECX
from tests.contract.longmode import MODES

MMIO_ADDR = 0xD000_0000  # no RAM there: every access is an MMIO exit


def expect(exit_, cls, addr: int, data: bytes) -> None:
    assert type(exit_) is cls, exit_
    assert (exit_.port if cls in (IoIn, IoOut) else exit_.addr) == addr
    assert bytes(exit_.data) == data


@pytest.mark.parametrize("mode", MODES)
def test_serial_byte_then_hlt(machine, mode):
    machine.load(asm.mov_al(ord("A")) + asm.mov_dx(0x3F8, mode) + asm.OUT_DX_AL + asm.HLT, mode)
    expect(machine.vcpu.run(), IoOut, 0x3F8, b"A")
    assert type(machine.vcpu.run()) is Hlt


@pytest.mark.parametrize("mode", MODES)
def test_in_takes_the_value_the_handler_wrote(machine, mode):
    machine.load(asm.in_imm(0x60) + asm.out_imm(0x61) + asm.HLT, mode)
    exit_ = machine.vcpu.run()
    assert type(exit_) is IoIn and exit_.port == 0x60 and len(exit_.data) == 1
    exit_.data[0] = 0x5A
    expect(machine.vcpu.run(), IoOut, 0x61, b"\x5a")
    assert machine.vcpu.get_regs().rax & 0xFF == 0x5A


@pytest.mark.parametrize("mode", MODES)
def test_wide_port_io(machine, mode):
    machine.load(asm.mov_r32(EAX, 0x12345678, mode) + asm.mov_dx(0x510, mode) + asm.out_dx_eax(mode)
                 + asm.out_dx_ax(mode) + asm.in_eax_dx(mode) + asm.out_dx_eax(mode) + asm.HLT, mode)
    vcpu = machine.vcpu
    expect(vcpu.run(), IoOut, 0x510, bytes.fromhex("78563412"))
    expect(vcpu.run(), IoOut, 0x510, bytes.fromhex("7856"))
    exit_ = vcpu.run()
    assert type(exit_) is IoIn and len(exit_.data) == 4
    exit_.data[:] = bytes.fromhex("efbeadde")
    expect(vcpu.run(), IoOut, 0x510, bytes.fromhex("efbeadde"))
    assert vcpu.get_regs().rax & 0xFFFF_FFFF == 0xDEADBEEF


@pytest.mark.parametrize("mode", ["protected", "long"])
def test_mmio_write_and_read_outside_ram(machine, mode):
    machine.load(
        asm.mov_r32(EBX, MMIO_ADDR) + asm.mov_al(0x5A) + asm.store8(EBX, EAX)  # byte write
        + asm.load8(ECX, EBX)  # byte read into cl
        + asm.mov_reg8(EAX, ECX) + asm.out_imm(0x62)  # show what was read
        + asm.mov_r32(EAX, 0x11223344) + asm.store32(EBX, EAX, 8)  # dword write at +8
        + asm.load32(EAX, EBX, 16) + asm.mov_dx(0x520) + asm.out_dx_eax()  # dword read at +16
        + asm.HLT, mode)
    vcpu = machine.vcpu
    expect(vcpu.run(), MmioWrite, MMIO_ADDR, b"\x5a")
    exit_ = vcpu.run()
    assert type(exit_) is MmioRead and exit_.addr == MMIO_ADDR and len(exit_.data) == 1
    exit_.data[0] = 0x77
    expect(vcpu.run(), IoOut, 0x62, b"\x77")
    expect(vcpu.run(), MmioWrite, MMIO_ADDR + 8, bytes.fromhex("44332211"))
    exit_ = vcpu.run()
    assert type(exit_) is MmioRead and exit_.addr == MMIO_ADDR + 16 and len(exit_.data) == 4
    exit_.data[:] = bytes.fromhex("01020304")
    expect(vcpu.run(), IoOut, 0x520, bytes.fromhex("01020304"))
    assert type(vcpu.run()) is Hlt


@pytest.mark.parametrize("mode", MODES)
def test_loop_with_flags(machine, mode):
    # al = 0; do { al++ } while (al != 5); out 0x80, al; then the same counting down with ecx.
    loop = asm.inc_al() + asm.cmp_al(5)
    count_down = asm.dec_r32(ECX)
    if mode == "real":
        count_down = b"\x66" + count_down
    machine.load(
        asm.mov_al(0) + loop + asm.jnz(-(len(loop) + 2)) + asm.out_imm(0x80)
        + asm.mov_r32(ECX, 3, mode) + count_down + asm.jnz(-(len(count_down) + 2))
        + asm.jz(2) + asm.out_imm(0x81) + asm.out_imm(0x82) + asm.HLT, mode)
    expect(machine.vcpu.run(), IoOut, 0x80, b"\x05")
    expect(machine.vcpu.run(), IoOut, 0x82, b"\x05")  # jz skipped the out to 0x81
    assert type(machine.vcpu.run()) is Hlt
    assert machine.vcpu.get_regs().rcx & 0xFFFF_FFFF == 0


def test_guest_ram_reads_and_writes_stay_in_ram(machine):
    machine.memory.write(0x6000, b"\x99")
    machine.load(asm.mov_r32(EBX, 0x6000) + asm.load8(EAX, EBX) + asm.out_imm(0x80)
                 + asm.mov_al(0x33) + asm.store8(EBX, EAX, 1) + asm.HLT)
    expect(machine.vcpu.run(), IoOut, 0x80, b"\x99")
    assert type(machine.vcpu.run()) is Hlt
    assert machine.memory.read(0x6001, 1) == b"\x33"


def test_real_mode_16_bit_addressing_and_high_bytes(machine):
    # mov bx,0x6000; mov ah,[bx+1]; mov al,ah; out 0x80,al; hlt
    machine.memory.write(0x6001, b"\x5c")
    machine.load(b"\xbb\x00\x60" + b"\x8a\x67\x01" + b"\x88\xe0" + asm.out_imm(0x80) + asm.HLT, "real")
    expect(machine.vcpu.run(), IoOut, 0x80, b"\x5c")
