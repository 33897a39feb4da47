"""MC146818 CMOS real-time clock at ports 0x70 (index, offset 0) and 0x71 (data, offset 1).

Why: Linux probes the CMOS clock at boot (rtc-cmos, mc146818_does_rtc_work()); with nothing
answering it reads 0xFF, sees "update in progress" for ever and polls ~20000 port reads before
giving up, each one a VM exit. This device answers at once.

The time is the host clock (``now()``, UNIX seconds, UTC) plus an offset the guest sets by
writing the time registers, in BCD or binary and 12 or 24-hour format as register B says. The
update cycle is never observed in progress (register A's UIP reads 0) and register D reports a
valid battery. Registers 0x0E-0x7F are battery-backed RAM. No interrupt is raised (IRQ 8 stays
quiet): the alarm, periodic and update-ended flags in register C never set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from domain.devices.state import check_range, check_state
from domain.errors import SnapshotFormatError

PORT_BASE = 0x70
PORT_SIZE = 2
INDEX = 0
DATA = 1

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06  # 1 = Sunday
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32  # where PC firmware (and QEMU) keep it; ACPI's FADT names it

A_UIP = 0x80  # update in progress (read-only)
A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
B_SET = 0x80  # updates frozen while the guest sets the time
B_DM_BINARY = 0x04
B_24H = 0x02
B_DEFAULT = B_24H  # BCD, 24-hour
D_VRT = 0x80  # valid RAM and time
HOUR_PM = 0x80  # 12-hour mode: PM flag in the hours register

NREGS = 128
INDEX_MASK = 0x7F  # bit 7 of the index is the NMI mask, not part of the address
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)
# Fields of a broken-down time, in the order of time.struct_time's first six.
YEAR, MONTH, DAY, HOUR, MINUTE, SECOND = range(6)


def _to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class CmosRtc:
    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(NREGS)
        self._ram[REG_A] = A_DEFAULT
        self._ram[REG_B] = B_DEFAULT
        self._offset = 0  # whole seconds added to the host clock
        self._frozen: list[int] | None = None  # broken-down time while register B's SET is on

    # --- the clock -------------------------------------------------------------------------------

    def _seconds(self) -> int:
        return int(self._now()) + self._offset

    def _fields(self) -> list[int]:
        if self._frozen is not None:
            return list(self._frozen)
        return list(time.gmtime(self._seconds())[:6])

    def _set_fields(self, f: list[int]) -> None:
        if self._frozen is not None:
            self._frozen = f
        else:
            self._offset = self._epoch(f) - int(self._now())

    @staticmethod
    def _epoch(f: list[int]) -> int:
        # timegm normalizes an out-of-range day, hour, minute or second as a running clock would
        # carry it; the month must be valid for it, so a nonsense month is clamped.
        import calendar  # only when the guest sets the clock: its import is not free

        month = min(max(f[MONTH], 1), 12)
        return calendar.timegm((f[YEAR], month, f[DAY], f[HOUR], f[MINUTE], f[SECOND], 0, 0, 0))

    def _encode(self, v: int) -> int:
        return v if self._ram[REG_B] & B_DM_BINARY else _to_bcd(v)

    def _decode(self, v: int) -> int:
        return v if self._ram[REG_B] & B_DM_BINARY else _from_bcd(v)

    def _read_time(self, reg: int) -> int:
        f = self._fields()
        if reg == REG_SECONDS:
            return self._encode(f[SECOND])
        if reg == REG_MINUTES:
            return self._encode(f[MINUTE])
        if reg == REG_HOURS:
            hour = f[HOUR]
            if self._ram[REG_B] & B_24H:
                return self._encode(hour)
            return self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        if reg == REG_WEEKDAY:
            # tm_wday counts from Monday = 0; the RTC from Sunday = 1.
            return self._encode((time.gmtime(self._epoch(f)).tm_wday + 1) % 7 + 1)
        if reg == REG_DAY:
            return self._encode(f[DAY])
        if reg == REG_MONTH:
            return self._encode(f[MONTH])
        if reg == REG_YEAR:
            return self._encode(f[YEAR] % 100)
        return self._encode(f[YEAR] // 100)  # REG_CENTURY

    def _write_time(self, reg: int, value: int) -> None:
        f = self._fields()
        if reg == REG_SECONDS:
            f[SECOND] = min(self._decode(value & 0x7F), 59)
        elif reg == REG_MINUTES:
            f[MINUTE] = min(self._decode(value & 0x7F), 59)
        elif reg == REG_HOURS:
            if self._ram[REG_B] & B_24H:
                f[HOUR] = min(self._decode(value & 0x3F), 23)
            else:
                hour = min(self._decode(value & 0x1F), 12) % 12
                f[HOUR] = hour + (12 if value & HOUR_PM else 0)
        elif reg == REG_WEEKDAY:
            return  # derived from the date; Linux ignores it too
        elif reg == REG_DAY:
            f[DAY] = min(max(self._decode(value & 0x3F), 1), 31)
        elif reg == REG_MONTH:
            f[MONTH] = min(max(self._decode(value & 0x1F), 1), 12)
        elif reg == REG_YEAR:
            f[YEAR] = f[YEAR] // 100 * 100 + min(self._decode(value), 99)
        else:  # REG_CENTURY
            f[YEAR] = max(min(self._decode(value), 99), 1) * 100 + f[YEAR] % 100
        self._set_fields(f)

    # --- the bus -----------------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        value = 0xFF  # the index port is write-only
        if offset == DATA:
            value = self._read_reg(self._index)
        data[0] = value
        data[1:] = bytes(len(data) - 1)

    def write(self, offset: int, data: memoryview) -> None:
        if not len(data):
            return
        if offset == INDEX:
            self._index = data[0] & INDEX_MASK
        elif offset == DATA:
            self._write_reg(self._index, data[0])

    def _read_reg(self, reg: int) -> int:
        if reg in TIME_REGS:
            return self._read_time(reg)
        if reg == REG_A:
            return self._ram[REG_A] & ~A_UIP
        if reg == REG_C:
            return 0  # no interrupt flags ever set; reading clears them
        if reg == REG_D:
            return D_VRT
        return self._ram[reg]

    def _write_reg(self, reg: int, value: int) -> None:
        if reg in TIME_REGS:
            self._write_time(reg, value)
        elif reg == REG_A:
            self._ram[REG_A] = value & ~A_UIP
        elif reg == REG_B:
            self._write_b(value)
        elif reg in (REG_C, REG_D):
            return  # read-only
        else:
            self._ram[reg] = value

    def _write_b(self, value: int) -> None:
        was_set = self._ram[REG_B] & B_SET
        if value & B_SET and not was_set:
            self._frozen = list(time.gmtime(self._seconds())[:6])
        self._ram[REG_B] = value
        if was_set and not value & B_SET:
            frozen, self._frozen = self._frozen, None
            self._offset = self._epoch(frozen) - int(self._now())

    # --- snapshot --------------------------------------------------------------------------------

    def save_state(self) -> dict:
        """The registers and RAM, and the guest's time as an offset from the host clock (a
        restored guest keeps the offset it set, not the source host's absolute time)."""
        with self.lock:
            return {"index": self._index, "ram": list(self._ram), "offset": self._offset,
                    "frozen": list(self._frozen) if self._frozen is not None else []}

    def restore_state(self, state: dict) -> None:
        check_state(state, {"index": int, "ram": list, "offset": int, "frozen": list})
        ram, frozen = state["ram"], state["frozen"]
        if len(ram) != NREGS or not all(isinstance(v, int) and 0 <= v <= 0xFF for v in ram):
            raise SnapshotFormatError("rtc register state is malformed")
        if frozen and (len(frozen) != 6 or not all(isinstance(v, int) for v in frozen)):
            raise SnapshotFormatError("rtc frozen time is malformed")
        index = check_range("index", state["index"], 0, INDEX_MASK)
        with self.lock:
            self._index = index
            self._ram = bytearray(ram)
            self._offset = state["offset"]
            self._frozen = list(frozen) if frozen else None
            if self._frozen is None and self._ram[REG_B] & B_SET:
                self._frozen = list(time.gmtime(self._seconds())[:6])
