"""16550A UART (COM1 for the guest console), after rust-vmm vm-superio's model.

Output leaves through an injected ``write(bytes)``; input arrives through ``enqueue_input`` into
a 64-byte receive FIFO whose overflow is dropped and counted (vm-superio, CVE-2020-27173: an
unbounded FIFO let a host-side writer exhaust VMM memory). The interrupt line is an injected
``trigger()`` (an irqfd edge in production), fired when an enabled condition becomes pending.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from domain.devices.state import check_state
from domain.errors import SnapshotFormatError

# Register offsets
DATA = 0  # RBR (read) / THR (write); DLL when DLAB
IER = 1  # DLM when DLAB
IIR = 2  # read; FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_VALID = 0x0F

IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_VALID = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 64
DEFAULT_DIVISOR = 12  # 9600 baud
_BYTES = tuple(bytes((i,)) for i in range(256))


class Serial:
    def __init__(self, write: Callable[[bytes], object], trigger: Callable[[], object]):
        self._out = write
        self._trigger = trigger
        self.lock = threading.Lock()  # shared with the bus: guest access vs. enqueue_input
        self.dropped_input = 0
        self.output_errors = 0
        # A chardev's input waits instead of being dropped: told here when the FIFO drained.
        self.on_room: Callable[[], object] | None = None
        self._reset_registers()

    def _reset_registers(self) -> None:
        self._fifo: deque[int] = deque()
        self._divisor = DEFAULT_DIVISOR
        self._ier = 0
        self._lcr = 0x03  # 8 data bits
        self._mcr = MCR_OUT2
        self._scr = 0
        self._fcr = 0
        self._overrun = False
        self._thre_pending = False
        self._irq_level = False

    # --- interrupt line --------------------------------------------------------------------------

    def _pending(self) -> int:
        """Highest-priority pending interrupt id, or IIR_NONE."""
        if self._ier & IER_RDA and self._fifo:
            return IIR_RDA
        if self._ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending() != IIR_NONE
        if level and not self._irq_level:
            self._trigger()
        self._irq_level = level

    # --- host side -----------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes fit (the rest is dropped)."""
        with self.lock:
            return self._receive(data)

    def _receive(self, data) -> int:
        room = FIFO_SIZE - len(self._fifo)
        taken = min(room, len(data))
        self._fifo.extend(data[:taken])
        if taken < len(data):
            self.dropped_input += len(data) - taken
            self._overrun = True
        if taken:
            self._update_irq()
        return taken

    def offer_input(self, data) -> int:
        """Input with back-pressure (a chardev): take what fits; the sender keeps the rest and
        offers it again after ``on_room``. Nothing is dropped, no overrun is signalled."""
        with self.lock:
            taken = min(FIFO_SIZE - len(self._fifo), len(data))
            if taken:
                self._fifo.extend(data[:taken])
                self._update_irq()
            return taken

    def fifo_free(self) -> int:
        """Room left in the receive FIFO (for host-side flow control)."""
        return FIFO_SIZE - len(self._fifo)

    # --- guest side ----------------------------------------------------------------------------

    # A console prints each character as an LSR read and a THR write, each a vCPU exit, so those
    # two take the shortest path (kvm-pvm makes every bytecode after an exit count).

    def read(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        if offset == LSR:
            data[0] = LSR_THRE | LSR_TEMT | (LSR_DR if self._fifo else 0) | (LSR_OE if self._overrun else 0)
            self._overrun = False
        else:
            data[0] = self._read_reg(offset)
        if len(data) > 1:
            data[1:] = bytes(len(data) - 1)

    def write(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        if offset == DATA and not (self._lcr & LCR_DLAB or self._mcr & MCR_LOOP or self._ier & IER_THRE):
            # THR with the THRE interrupt off: the byte leaves at once and the line cannot move.
            try:
                self._out(_BYTES[data[0]])
            except OSError:
                self.output_errors += 1
            self._thre_pending = True
            return
        self._write_reg(offset, data[0])

    def _read_reg(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._divisor & 0xFF
            value = 0
            if self._fifo:
                value = self._fifo.popleft()
                if not self._fifo and self.on_room is not None:
                    self.on_room()  # never blocks (CharBackend.input_ready)
            self._update_irq()
            return value
        if offset == IER:
            return (self._divisor >> 8) & 0xFF if dlab else self._ier
        if offset == IIR:
            iid = self._pending()
            if iid == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THRE
            self._update_irq()
            return iid | (IIR_FIFO if self._fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == MSR:
            if self._mcr & MCR_LOOP:
                m = self._mcr
                return ((MSR_DSR if m & MCR_DTR else 0) | (MSR_CTS if m & MCR_RTS else 0)
                        | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
            return MSR_DCD | MSR_DSR | MSR_CTS
        if offset == SCR:
            return self._scr
        return 0

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
                return
            self._thre_pending = False
            self._update_irq()  # THRE drops ...
            if self._mcr & MCR_LOOP:
                self._receive(bytes((value,)))
            else:
                try:
                    self._out(_BYTES[value])
                except OSError:
                    self.output_errors += 1
            self._thre_pending = True  # ... and rises again: the byte left at once
            self._update_irq()
        elif offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
                return
            newly_thre = value & IER_THRE and not self._ier & IER_THRE
            self._ier = value & IER_VALID
            if newly_thre:  # a 16550 raises THRE at once when it is enabled with THR empty
                self._thre_pending = True
            self._update_irq()
        elif offset == IIR:  # FCR
            if (value ^ self._fcr) & FCR_ENABLE or value & FCR_CLEAR_RX:
                self._fifo.clear()
            self._fcr = value & (FCR_ENABLE | 0xC0)
            self._update_irq()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & MCR_VALID
        elif offset == SCR:
            self._scr = value

    # --- snapshot ------------------------------------------------------------------------------

    def save_state(self) -> dict:
        with self.lock:
            return {"divisor": self._divisor, "ier": self._ier, "lcr": self._lcr, "mcr": self._mcr,
                    "scr": self._scr, "fcr": self._fcr, "thre_pending": self._thre_pending,
                    "fifo": bytes(self._fifo)}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"divisor": int, "ier": int, "lcr": int, "mcr": int, "scr": int, "fcr": int,
                            "thre_pending": bool, "fifo": bytes})
        if len(state["fifo"]) > FIFO_SIZE:
            raise SnapshotFormatError("serial FIFO state is larger than the FIFO")
        with self.lock:
            self._divisor = state["divisor"] & 0xFFFF
            self._ier = state["ier"] & IER_VALID
            self._lcr = state["lcr"] & 0xFF
            self._mcr = state["mcr"] & MCR_VALID
            self._scr = state["scr"] & 0xFF
            self._fcr = state["fcr"] & (FCR_ENABLE | 0xC0)
            self._thre_pending = state["thre_pending"]
            self._fifo = deque(state["fifo"])
            self._irq_level = False
