"""A tiny x86 interpreter: just enough for the contract tests' guest programs.

It runs the same few bytes of machine code that KVM runs, in real mode, 32-bit protected mode
(flat segments) or 64-bit long mode (paging assumed to be the identity). Supported:

  nop (90), hlt (F4), mov r8,imm8 (B0+r), mov r,imm (B8+r, with 66/REX.W),
  mov r/m,r and mov r,r/m (88, 89, 8A, 8B; [reg], [reg+disp8/disp32] or register operands,
  no SIB), inc/dec r (FE /0 /1, FF /0 /1 on registers; 40-4F outside 64-bit mode),
  cmp al,imm8 (3C), jmp rel8/rel32 (EB, E9), jz/jnz rel8 (74, 75),
  in/out with imm8 or dx port (E4-E7, EC-EF), prefixes 66, 67 and REX.
Only ZF, SF and CF are computed. Anything else is "unsupported": the caller idles, like a guest
waiting for an interrupt.

step() returns None to go on, or a tuple describing why the vCPU must stop (see the EV_*
constants); register destinations of reads are (reg, size, high_byte) triples.
"""

from __future__ import annotations

from typing import Protocol

EV_OUT = "out"  # (EV_OUT, port, size, value)
EV_IN = "in"  # (EV_IN, port, size, dest)
EV_MMIO_W = "mmio_w"  # (EV_MMIO_W, addr, size, value)
EV_MMIO_R = "mmio_r"  # (EV_MMIO_R, addr, size, dest)
EV_HLT = "hlt"  # (EV_HLT,)
EV_UNSUPPORTED = "unsupported"  # (EV_UNSUPPORTED, opcode bytes)
EV_FETCH_FAULT = "fetch_fault"  # (EV_FETCH_FAULT, linear address)

ZF, SF, CF = 1 << 6, 1 << 7, 1 << 0
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_CR0_PE, _CR0_PG = 1 << 0, 1 << 31
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
# 16-bit addressing: ModRM rm -> base/index registers (bx=3, bp=5, si=6, di=7).
_RM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6,), (7,), (5,), (3,))


class Bus(Protocol):
    def fetch(self, addr: int, length: int) -> bytes: ...

    def read(self, addr: int, size: int) -> int | None: ...

    def write(self, addr: int, size: int, value: int) -> bool: ...

    def ioevent(self, pio: bool, addr: int, size: int, value: int) -> bool: ...


class _Unsupported(Exception):
    pass


class Cpu:
    """Architectural state plus the decoder. ``gpr`` holds 16 64-bit values."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.gpr = [0] * 16
        self.rip = 0
        self.rflags = 0x2
        self.mode = 16
        self.cs_base = 0
        self.ds_base = 0

    def set_mode(self, cr0: int, efer: int, cs_l: int, cs_db: int, cs_base: int, ds_base: int) -> None:
        long_mode = bool(efer & _EFER_LMA or (efer & _EFER_LME and cr0 & _CR0_PG))
        if not cr0 & _CR0_PE:
            self.mode = 16
        elif long_mode and cs_l:
            self.mode = 64
        else:
            self.mode = 32 if cs_db else 16
        self.cs_base, self.ds_base = cs_base, ds_base

    # --- registers -------------------------------------------------------------------------------

    def get(self, reg: int, size: int, high: bool = False) -> int:
        if high:
            return (self.gpr[reg] >> 8) & 0xFF
        return self.gpr[reg] & _MASK[size]

    def put(self, reg: int, size: int, value: int, high: bool = False) -> None:
        old = self.gpr[reg]
        if high:
            self.gpr[reg] = (old & ~0xFF00) | (value & 0xFF) << 8
        elif size >= 4:  # a 32-bit write zero-extends, as on hardware
            self.gpr[reg] = value & _MASK[size]
        else:
            self.gpr[reg] = (old & ~_MASK[size]) | (value & _MASK[size])

    def put_dest(self, dest: tuple[int, int, bool], value: int) -> None:
        self.put(dest[0], dest[1], value, dest[2])

    # --- decoding --------------------------------------------------------------------------------

    def step(self):
        start = self.rip
        ip_mask = 0xFFFF_FFFF_FFFF_FFFF if self.mode == 64 else (0xFFFF if self.mode == 16 else 0xFFFF_FFFF)
        linear = start if self.mode == 64 else (self.cs_base + (start & ip_mask)) & 0xFFFF_FFFF_FFFF_FFFF
        code = self.bus.fetch(linear, 15)
        if not code:
            return (EV_FETCH_FAULT, linear)
        try:
            # Every instruction decodes all its operands before it changes any state, so an
            # unsupported one leaves the CPU exactly as it was.
            return self._decode(code)
        except (_Unsupported, IndexError):
            return (EV_UNSUPPORTED, bytes(code[:4]))

    def _decode(self, code: bytes):
        mode = self.mode
        pos = 0
        opsize = 2 if mode == 16 else 4
        addrsize = {16: 2, 32: 4, 64: 8}[mode]
        rex = 0
        while True:
            b = code[pos]
            if b == 0x66:
                opsize = 4 if opsize == 2 else 2
            elif b == 0x67:
                addrsize = 4 if addrsize in (2, 8) else 2
            elif mode == 64 and 0x40 <= b <= 0x4F:
                rex = b
            else:
                break
            pos += 1
        if rex & 8:
            opsize = 8
        op = code[pos]
        pos += 1
        return _Decoder(self, code, pos, opsize, addrsize, rex).execute(op)


class _Decoder:
    """One instruction: operand decoding and execution. Sets rip past it before any exit."""

    def __init__(self, cpu: Cpu, code: bytes, pos: int, opsize: int, addrsize: int, rex: int):
        self.cpu, self.code, self.pos = cpu, code, pos
        self.opsize, self.addrsize, self.rex = opsize, addrsize, rex

    def imm(self, size: int, signed: bool = False) -> int:
        if self.pos + size > len(self.code):
            raise _Unsupported
        v = int.from_bytes(self.code[self.pos : self.pos + size], "little", signed=signed)
        self.pos += size
        return v

    def reg8(self, n: int) -> tuple[int, bool]:
        """8-bit register n: without REX, 4-7 are AH, CH, DH, BH."""
        if not self.rex and 4 <= n <= 7:
            return n - 4, True
        return n, False

    def modrm(self):
        """-> (reg field, ('reg', n) | ('mem', linear address))."""
        b = self.imm(1)
        mod, reg, rm = b >> 6, (b >> 3) & 7, b & 7
        reg |= (self.rex & 4) << 1
        if mod == 3:
            return reg, ("reg", rm | (self.rex & 1) << 3)
        cpu = self.cpu
        if self.addrsize == 2:
            if mod == 0 and rm == 6:
                raise _Unsupported
            ea = sum(cpu.gpr[r] & 0xFFFF for r in _RM16[rm])
            ea += self.imm(1, True) if mod == 1 else self.imm(2, True) if mod == 2 else 0
            ea &= 0xFFFF
        else:
            if rm == 4 or (mod == 0 and rm == 5):
                raise _Unsupported  # SIB and absolute/RIP-relative forms
            ea = cpu.gpr[rm | (self.rex & 1) << 3]
            ea += self.imm(1, True) if mod == 1 else self.imm(4, True) if mod == 2 else 0
            ea &= _MASK[self.addrsize]
        base = 0 if cpu.mode == 64 else cpu.ds_base
        return reg, ("mem", (base + ea) & 0xFFFF_FFFF_FFFF_FFFF)

    def finish(self) -> None:
        cpu = self.cpu
        cpu.rip = (cpu.rip + self.pos) & (0xFFFF if cpu.mode == 16 else _MASK[8 if cpu.mode == 64 else 4])

    def jump(self, rel: int) -> None:
        self.finish()
        cpu = self.cpu
        cpu.rip = (cpu.rip + rel) & (0xFFFF if cpu.mode == 16 else _MASK[8 if cpu.mode == 64 else 4])

    def flags(self, result: int, size: int, carry: bool | None = None) -> None:
        cpu = self.cpu
        f = cpu.rflags & ~(ZF | SF | (CF if carry is not None else 0))
        result &= _MASK[size]
        if result == 0:
            f |= ZF
        if result >> (size * 8 - 1):
            f |= SF
        if carry:
            f |= CF
        cpu.rflags = f

    def execute(self, op: int):
        cpu = self.cpu
        if op == 0x90:
            self.finish()
            return None
        if op == 0xF4:
            self.finish()
            return (EV_HLT,)
        if 0xB0 <= op <= 0xB7:
            reg, high = self.reg8((op & 7) | (self.rex & 1) << 3)
            value = self.imm(1)
            self.finish()
            cpu.put(reg, 1, value, high)
            return None
        if 0xB8 <= op <= 0xBF:
            value = self.imm(self.opsize)
            self.finish()
            cpu.put((op & 7) | (self.rex & 1) << 3, self.opsize, value)
            return None
        if op in (0x88, 0x89, 0x8A, 0x8B):
            return self.mov(op)
        if op in (0xFE, 0xFF):
            reg, (kind, rm) = self.modrm()
            if kind != "reg" or reg & 7 > 1:
                raise _Unsupported
            size = 1 if op == 0xFE else self.opsize
            r, high = self.reg8(rm) if size == 1 else (rm, False)
            value = cpu.get(r, size, high) + (1 if reg & 7 == 0 else -1)
            self.finish()
            cpu.put(r, size, value, high)
            self.flags(value, size)
            return None
        if cpu.mode != 64 and 0x40 <= op <= 0x4F:
            value = cpu.get(op & 7, self.opsize) + (1 if op < 0x48 else -1)
            self.finish()
            cpu.put(op & 7, self.opsize, value)
            self.flags(value, self.opsize)
            return None
        if op == 0x3C:
            imm = self.imm(1)
            al = cpu.get(0, 1)
            self.finish()
            self.flags(al - imm, 1, carry=al < imm)
            return None
        if op == 0xEB:
            self.jump(self.imm(1, True))
            return None
        if op == 0xE9:
            self.jump(self.imm(2 if self.opsize == 2 else 4, True))
            return None
        if op in (0x74, 0x75):
            rel = self.imm(1, True)
            taken = bool(cpu.rflags & ZF) == (op == 0x74)
            self.jump(rel) if taken else self.finish()
            return None
        if op in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF):
            return self.io(op)
        raise _Unsupported

    def mov(self, op: int):
        cpu = self.cpu
        size = 1 if op in (0x88, 0x8A) else self.opsize
        reg, (kind, target) = self.modrm()
        r, high = self.reg8(reg) if size == 1 else (reg, False)
        self.finish()
        if op in (0x88, 0x89):  # r/m <- reg
            value = cpu.get(r, size, high)
            if kind == "reg":
                t, th = self.reg8(target) if size == 1 else (target, False)
                cpu.put(t, size, value, th)
            elif not cpu.bus.write(target, size, value) and not cpu.bus.ioevent(False, target, size, value):
                return (EV_MMIO_W, target, size, value)
            return None
        if kind == "reg":  # reg <- r/m
            t, th = self.reg8(target) if size == 1 else (target, False)
            cpu.put(r, size, cpu.get(t, size, th), high)
            return None
        value = cpu.bus.read(target, size)
        if value is None:
            return (EV_MMIO_R, target, size, (r, size, high))
        cpu.put(r, size, value, high)
        return None

    def io(self, op: int):
        cpu = self.cpu
        size = 1 if op & 1 == 0 else min(self.opsize, 4)
        port = self.imm(1) if op < 0xEC else cpu.get(2, 2)
        self.finish()
        if op in (0xE4, 0xE5, 0xEC, 0xED):
            return (EV_IN, port, size, (0, size, False))
        value = cpu.get(0, size)
        if cpu.bus.ioevent(True, port, size, value):
            return None
        return (EV_OUT, port, size, value)
