"""Minimal i8042 keyboard controller at ports 0x60 (data, offset 0) and 0x64 (status/command,
offset 4): enough for Linux's probe to finish quickly and for ``reboot=k`` to reset the VM
(command 0xFE, or clearing the reset line through the output port), which calls ``reset()``.
No keyboard or mouse is attached."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from domain.devices.state import check_state
from domain.errors import SnapshotFormatError

DATA = 0
COMMAND = 4

# Status register
ST_OBF = 0x01  # output buffer full
ST_SYS = 0x04  # system flag (self-test passed)
ST_CMD = 0x08  # last write was a command
ST_UNLOCKED = 0x10  # keyboard not inhibited
ST_AUX_OBF = 0x20  # output byte is from the aux port

# Controller configuration byte
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBD_INT | CTR_SYS | CTR_XLATE

# Commands
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_RESET = 0xFE

OUTPORT_RESET_LINE = 0x01  # 0 = CPU held in reset
OUTPORT_A20 = 0x02
OUTPORT_DEFAULT = OUTPORT_RESET_LINE | OUTPORT_A20

SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00
OUTBUF_MAX = 16


class I8042:
    def __init__(self, reset: Callable[[], object], trigger_kbd: Callable[[], object] | None = None):
        self._reset = reset
        self._trigger_kbd = trigger_kbd
        self.lock = threading.Lock()
        self.reset_requests = 0
        self._ctr = CTR_DEFAULT
        self._outport = OUTPORT_DEFAULT
        self._status = ST_UNLOCKED | ST_SYS
        self._pending_cmd: int | None = None
        self._outbuf: deque[tuple[int, bool]] = deque()

    def _push(self, value: int, aux: bool = False) -> None:
        if len(self._outbuf) < OUTBUF_MAX:
            self._outbuf.append((value & 0xFF, aux))
            if not aux and self._ctr & CTR_KBD_INT and self._trigger_kbd is not None:
                self._trigger_kbd()

    def _request_reset(self) -> None:
        self.reset_requests += 1
        self._reset()

    def read(self, offset: int, data: memoryview) -> None:
        value = 0
        if offset == COMMAND:
            value = self._status_byte()
        elif offset == DATA and self._outbuf:
            value = self._outbuf.popleft()[0]
        if len(data):
            data[0] = value
            data[1:] = bytes(len(data) - 1)

    def _status_byte(self) -> int:
        status = self._status
        if self._outbuf:
            status |= ST_OBF | (ST_AUX_OBF if self._outbuf[0][1] else 0)
        return status

    def write(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        value = data[0]
        if offset == COMMAND:
            self._status |= ST_CMD
            self._command(value)
        elif offset == DATA:
            self._status &= ~ST_CMD
            self._data(value)

    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if cmd == CMD_READ_CTR:
            self._push(self._ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX_OUTBUF, CMD_WRITE_AUX):
            self._pending_cmd = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUX_DISABLE
        elif cmd == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBD_DISABLE
        elif cmd == CMD_SELF_TEST:
            self._status |= ST_SYS
            self._push(SELF_TEST_OK)
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._push(PORT_TEST_OK)
        elif cmd == CMD_READ_OUTPORT:
            self._push(self._outport)
        elif cmd == CMD_RESET:
            self._request_reset()
        elif 0xF0 <= cmd <= 0xFF and not cmd & 0x01:
            self._request_reset()  # pulse output port bit 0 (the reset line) low
        # Anything else: accepted and ignored, as on a controller with nothing attached.

    def _data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd == CMD_WRITE_CTR:
            self._ctr = value
            self._status = (self._status & ~ST_SYS) | (ST_SYS if value & CTR_SYS else 0)
        elif cmd == CMD_WRITE_OUTPORT:
            self._outport = value
            if not value & OUTPORT_RESET_LINE:
                self._request_reset()
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._push(value)
        elif cmd == CMD_WRITE_AUX_OUTBUF:
            self._push(value, aux=True)
        # CMD_WRITE_AUX and plain data are for devices we do not have: dropped.

    def save_state(self) -> dict:
        with self.lock:
            return {"ctr": self._ctr, "outport": self._outport, "status": self._status,
                    "outbuf": [[v, a] for v, a in self._outbuf]}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"ctr": int, "outport": int, "status": int, "outbuf": list})
        buf = state["outbuf"]
        if len(buf) > OUTBUF_MAX or not all(
                isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], int) for e in buf):
            raise SnapshotFormatError("i8042 output buffer state is malformed")
        with self.lock:
            self._ctr = state["ctr"] & 0xFF
            self._outport = state["outport"] & 0xFF
            self._status = state["status"] & 0xFF
            self._outbuf = deque((int(v) & 0xFF, bool(a)) for v, a in buf)
            self._pending_cmd = None
