"""Encoders for the few instructions the contract programs use (the fake interpreter's subset).

Mode-aware where operand size differs: in real mode a 32-bit operand needs the 0x66 prefix, in
protected and long mode a 16-bit one does.
"""

from __future__ import annotations

EAX, ECX, EDX, EBX = 0, 1, 2, 3

NOP = b"\x90"
HLT = b"\xf4"
JMP_SELF = b"\xeb\xfe"
OUT_DX_AL = b"\xee"
OUT_DX_EAX_32 = b"\xef"  # in 32/64-bit mode; see out_dx_eax for real mode
IN_AL_DX = b"\xec"


def _o32(mode: str) -> bytes:
    return b"\x66" if mode == "real" else b""


def _o16(mode: str) -> bytes:
    return b"" if mode == "real" else b"\x66"


def mov_al(value: int) -> bytes:
    return bytes([0xB0, value])


def mov_r32(reg: int, value: int, mode: str = "long") -> bytes:
    return _o32(mode) + bytes([0xB8 + reg]) + value.to_bytes(4, "little")


def mov_dx(port: int, mode: str = "long") -> bytes:
    return _o16(mode) + bytes([0xBA]) + port.to_bytes(2, "little")


def out_imm(port: int) -> bytes:
    return bytes([0xE6, port])


def in_imm(port: int) -> bytes:
    return bytes([0xE4, port])


def out_dx_eax(mode: str = "long") -> bytes:
    return _o32(mode) + b"\xef"


def out_dx_ax(mode: str = "long") -> bytes:
    return _o16(mode) + b"\xef"


def in_eax_dx(mode: str = "long") -> bytes:
    return _o32(mode) + b"\xed"


def store8(base: int, src: int, disp: int = 0) -> bytes:
    """mov byte [base + disp8], src8 (32/64-bit addressing)."""
    return _mem(0x88, base, src, disp)


def store32(base: int, src: int, disp: int = 0) -> bytes:
    return _mem(0x89, base, src, disp)


def load8(dst: int, base: int, disp: int = 0) -> bytes:
    return _mem(0x8A, base, dst, disp)


def load32(dst: int, base: int, disp: int = 0) -> bytes:
    return _mem(0x8B, base, dst, disp)


def mov_reg8(dst: int, src: int) -> bytes:
    return bytes([0x88, 0xC0 | src << 3 | dst])


def _mem(op: int, base: int, reg: int, disp: int) -> bytes:
    if disp:
        return bytes([op, 0x40 | reg << 3 | base, disp & 0xFF])
    return bytes([op, reg << 3 | base])


def inc_al() -> bytes:
    return b"\xfe\xc0"


def inc_r32(reg: int) -> bytes:
    return bytes([0xFF, 0xC0 | reg])


def dec_r32(reg: int) -> bytes:
    return bytes([0xFF, 0xC8 | reg])


def cmp_al(value: int) -> bytes:
    return bytes([0x3C, value])


def jnz(rel: int) -> bytes:
    return bytes([0x75, rel & 0xFF])


def jz(rel: int) -> bytes:
    return bytes([0x74, rel & 0xFF])


def jmp(rel: int) -> bytes:
    return bytes([0xEB, rel & 0xFF])
