"""MC146818 CMOS real-time clock at ports 0x70 (index, offset 0) and 0x71 (data, offset 1).

Why: Linux probes the CMOS clock at boot (rtc-cmos, mc146818_does_rtc_work()); with nothing
answering it reads 0xFF, sees "update in progress" for ever and polls ~20000 port reads before
giving up, each one a VM exit. This device answers at once. Linux's rtc-cmos then takes IRQ 8:
hwclock waits for the update-ended interrupt, rtcwake and /dev/rtc alarms use the alarm one.

The time is the host clock (``now()``, UNIX seconds, UTC) plus an offset the guest sets by
writing the time registers, in BCD or binary and 12 or 24-hour format as register B says. The
update cycle is never observed in progress (register A's UIP reads 0) and register D reports a
valid battery. Registers 0x0E-0x7F are battery-backed RAM.

Interrupts (as QEMU's hw/rtc/mc146818rtc.c and the datasheet): register C latches PF at every
periodic tick (register A's rate), UF when the seconds advance and AF when the time then matches
the alarm registers (0xC0-0xFF = any value); IRQF is set, and ``trigger()`` fires (IRQ 8 is an
ISA edge), when a flag is latched whose enable bit in register B (PIE, AIE, UIE) is on. Reading C
returns and clears it all. The time only runs with register A's divider bits at 010 (the 32.768
kHz base; 11x holds the divider chain in reset, as Linux does while setting the clock) and
updates, so UF and AF, stop while register B's SET is on.

The flags are worked out when they are looked at (reading C, or writing a time, alarm, A or B
register), so nothing runs while the guest only polls; a timer (``timer``, domain.ports.Timers)
is armed only while a source is enabled and IRQF is clear, i.e. when an interrupt could follow.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from domain.devices.state import check_range, check_state
from domain.errors import SnapshotFormatError
from domain.ports import Timers

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
A_DV_MASK = 0x70  # divider control
A_DV_RUN = 0x20  # 010: the 32.768 kHz time base, dividers running
A_RS_MASK = 0x0F  # periodic rate select
A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
B_SET = 0x80  # updates frozen while the guest sets the time
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
B_DEFAULT = B_24H  # BCD, 24-hour
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
C_FLAGS = C_PF | C_AF | C_UF  # each flag has its enable at the same bit of register B
ALARM_ANY = 0xC0  # an alarm register at 0xC0-0xFF matches every value
D_VRT = 0x80  # valid RAM and time
HOUR_PM = 0x80  # 12-hour mode: PM flag in the hours register

NREGS = 128
INDEX_MASK = 0x7F  # bit 7 of the index is the NMI mask, not part of the address
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)
# Fields of a broken-down time, in the order of time.struct_time's first six.
YEAR, MONTH, DAY, HOUR, MINUTE, SECOND = range(6)
# Registers whose writes change what the flags or the timer do (the rest is plain RAM).
TIMING_REGS = frozenset((*TIME_REGS, REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM, REG_A, REG_B))

BASE_HZ = 32768
SECONDS_PER_DAY = 86400
# A timer is set this far past the tick or second it waits for: the deadline is converted from
# the host clock (where ticks and seconds fall) to the monotonic one, read a moment apart.
DEADLINE_MARGIN = 100e-6

# The fastest the timer runs, whatever rate the guest picks (up to 8192 Hz): 1024 Hz, register
# A's default rate. Each expiry is a Python callback and an irqfd write in the one I/O thread
# every virtio device shares, then a guest interrupt whose handler reads C (two port exits into
# Python on a vCPU thread). On the nested-KVM test host a guest asking 1024 Hz gets ~450 a
# second already (tests/guests rtc): faster would only buy more missed deadlines and starve
# the virtio queues, while Linux's rtc-cmos users (hwclock, alarms) need 1 Hz.
# Ticks due together coalesce into one PF and one interrupt (PF is a flag, not a counter), and a
# late expiry schedules the next tick after now, never a burst to catch up.
MAX_TIMER_HZ = 1024
MIN_TIMER_INTERVAL = 1.0 / MAX_TIMER_HZ

STATE_VERSION = 2  # 2 added register C and how far its flags were accounted
STATE_VERSIONS = (1, 2)


def periodic_period(rate: int) -> float | None:
    """Seconds between periodic ticks for register A's rate select, None when off. Rates 3-15
    give 65536 >> rate Hz (8192 Hz .. 2 Hz); 1 and 2 alias rates 8 and 9 (256 and 128 Hz) on a
    32.768 kHz time base. Every period divides a second: the ticks and the seconds come from
    one divider chain, so ticks fall at whole multiples of the period on the clock."""
    rate &= A_RS_MASK
    if rate == 0:
        return None
    if rate <= 2:
        rate += 7
    return (1 << (rate - 1)) / BASE_HZ


def next_alarm(tod: int, alarm: tuple[int | None, int | None, int | None]) -> int:
    """Seconds (1..86400) from the time of day ``tod`` (seconds since midnight) to the next one
    matching ``alarm`` (hour, minute, second; None matches any)."""
    ah, am, asec = alarm
    start = tod + 1
    for day in (0, SECONDS_PER_DAY):
        for h in range(24) if ah is None else (ah,):
            hour = day + h * 3600
            if hour + 3599 < start:
                continue
            for m in range(60) if am is None else (am,):
                minute = hour + m * 60
                if minute + 59 < start:
                    continue
                s = max(start - minute, 0) if asec is None else asec
                if minute + s >= start:
                    return minute + s - tod
    raise ValueError(f"alarm {alarm} out of range")


def _to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class CmosRtc:
    def __init__(self, now: Callable[[], float], timer: Timers | None = None,
                 trigger: Callable[[], object] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        """``now``: the host's UNIX time; ``timer`` runs callbacks at ``monotonic()`` deadlines
        (none: the flags still latch, but no interrupt is raised on its own); ``trigger``: an
        edge on IRQ 8."""
        self._now = now
        self._timer = timer
        self._trigger = trigger
        self._mono = monotonic
        self.lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(NREGS)
        self._ram[REG_A] = A_DEFAULT
        self._ram[REG_B] = B_DEFAULT
        self._offset = 0  # whole seconds added to the host clock
        self._frozen: list[int] | None = None  # broken-down time while the clock is halted
        # Interrupt state. Register C as latched so far; the flags owed since are worked out
        # from how far each source was accounted: periodic ticks up to host time _pf_upto
        # (ticks fall at multiples of the period: the offset is whole seconds), updates up to
        # guest second _uf_upto. Both move only when the flags are looked at, so a saved state
        # is the same however long after it is taken (migration compares two collections).
        self._c = 0
        self._pf_upto = now()
        self._uf_upto = self._seconds()
        self._armed: tuple[float, object] | None = None  # (deadline, timer handle)
        self._generation = 0  # the armed timer's; an older callback that still runs is stale
        self._last_fire = -math.inf

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

    # --- interrupts ------------------------------------------------------------------------------

    def _dividers_run(self) -> bool:
        return self._ram[REG_A] & A_DV_MASK == A_DV_RUN

    def _updating(self) -> bool:
        return self._dividers_run() and not self._ram[REG_B] & B_SET

    def _period(self) -> float | None:
        return periodic_period(self._ram[REG_A]) if self._dividers_run() else None

    def _alarm_field(self, reg: int, limit: int) -> int | None:
        """The alarm register's value, None for "any", -1 when it can never match."""
        v = self._ram[reg]
        if v & ALARM_ANY == ALARM_ANY:
            return None
        if reg == REG_HOURS_ALARM and not self._ram[REG_B] & B_24H:
            hour = self._decode(v & 0x7F)
            if not 1 <= hour <= 12:
                return -1
            return hour % 12 + (12 if v & HOUR_PM else 0)
        v = self._decode(v)
        return v if v < limit else -1

    def _alarm(self) -> tuple[int | None, int | None, int | None] | None:
        """(hour, minute, second) of the alarm, None when no time of day matches it."""
        alarm = (self._alarm_field(REG_HOURS_ALARM, 24), self._alarm_field(REG_MINUTES_ALARM, 60),
                 self._alarm_field(REG_SECONDS_ALARM, 60))
        return None if -1 in alarm else alarm

    def _catch_up(self) -> bool:
        """Latch the flags owed up to now; True when IRQF rose (an edge is due)."""
        wall = self._now()
        period = self._period()
        if period is not None and wall // period > self._pf_upto // period:
            self._c |= C_PF
        self._pf_upto = max(wall, self._pf_upto)
        sec = int(wall) + self._offset
        if self._updating() and sec > self._uf_upto:
            self._c |= C_UF
            alarm = self._alarm()
            if alarm is not None and self._uf_upto + next_alarm(self._uf_upto % SECONDS_PER_DAY, alarm) <= sec:
                self._c |= C_AF
        self._uf_upto = sec
        return self._update_irqf()

    def _update_irqf(self) -> bool:
        """IRQF follows the enabled flags; True when it rose."""
        was = self._c & C_IRQF
        if self._c & self._ram[REG_B] & C_FLAGS:
            self._c |= C_IRQF
        else:
            self._c &= ~C_IRQF
        return not was and bool(self._c & C_IRQF)

    def _raise(self) -> None:
        if self._trigger is not None:
            self._trigger()

    def _next_deadline(self, mono: float) -> float | None:
        """When an enabled source next sets its flag, if an interrupt could follow."""
        if self._c & C_IRQF:
            return None  # the edge is out; nothing more until the guest reads C
        b = self._ram[REG_B]
        wall = self._now()
        wait = math.inf  # host-clock seconds to the next event
        period = self._period()
        if b & B_PIE and period is not None:
            wait = (max(wall, self._pf_upto) // period + 1) * period - wall
        if b & (B_UIE | B_AIE) and self._updating():
            next_second = math.floor(wall) + 1 - wall
            if b & B_UIE:
                wait = min(wait, next_second)
            else:
                alarm = self._alarm()
                if alarm is not None:
                    tod = (int(wall) + self._offset) % SECONDS_PER_DAY
                    wait = min(wait, next_second + next_alarm(tod, alarm) - 1)
        if wait == math.inf:
            return None
        return max(mono + wait + DEADLINE_MARGIN, self._last_fire + MIN_TIMER_INTERVAL)

    def _rearm(self, mono: float) -> None:
        if self._timer is None:
            return
        deadline = self._next_deadline(mono)
        if self._armed is not None:
            if self._armed[0] == deadline:
                return
            self._timer.cancel(self._armed[1])
            self._armed = None
        if deadline is not None:
            self._generation += 1
            gen = self._generation
            self._armed = (deadline, self._timer.call_at(deadline, lambda: self._expired(gen)))

    def _expired(self, generation: int) -> None:
        """Timer callback, in the I/O thread."""
        with self.lock:
            if generation != self._generation or self._armed is None:
                return  # re-armed or cancelled after this expiry was already on its way
            self._armed = None
            mono = self._mono()
            self._last_fire = mono
            if self._catch_up():
                self._raise()
            self._rearm(mono)

    @property
    def timer_deadline(self) -> float | None:
        """The armed timer's deadline (monotonic), None when idle."""
        return self._armed[0] if self._armed is not None else None

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
            return self._read_c()
        if reg == REG_D:
            return D_VRT
        return self._ram[reg]

    def _read_c(self) -> int:
        self._catch_up()  # an edge found only now is not raised: the guest sees the flags
        value, self._c = self._c, 0
        self._rearm(self._mono())
        return value

    def _write_reg(self, reg: int, value: int) -> None:
        if reg in (REG_C, REG_D):
            return  # read-only
        if reg not in TIMING_REGS:
            self._ram[reg] = value
            return
        self._catch_up()  # what the old settings owe
        halted = not self._updating()
        if reg in TIME_REGS:
            self._write_time(reg, value)
        elif reg == REG_A:
            self._ram[REG_A] = value & ~A_UIP
        else:  # register B or an alarm register
            self._ram[reg] = value
        self._halt_or_resume(halted)
        self._pf_upto = self._now()  # new settings count from here
        self._uf_upto = self._seconds()  # a new time or a resumed clock is no update
        if self._update_irqf():
            self._raise()
        self._rearm(self._mono())

    def _halt_or_resume(self, was_halted: bool) -> None:
        """Freeze the broken-down time when updates stop (SET, or dividers not running) and run
        on from it when they resume."""
        halted = not self._updating()
        if halted and not was_halted:
            self._frozen = list(time.gmtime(self._seconds())[:6])
        elif was_halted and not halted:
            frozen, self._frozen = self._frozen, None
            self._offset = self._epoch(frozen) - int(self._now())

    # --- snapshot --------------------------------------------------------------------------------

    def save_state(self) -> dict:
        """The registers and RAM, and the guest's time as an offset from the host clock (a
        restored guest keeps the offset it set, not the source host's absolute time). Version 2
        adds register C and how far its flags were accounted, on the host clock (periodic
        ticks, in ns) and the guest's (update seconds): ticks and updates since then latch
        their flags at the destination."""
        with self.lock:
            return {"index": self._index, "ram": list(self._ram), "offset": self._offset,
                    "frozen": list(self._frozen) if self._frozen is not None else [],
                    "c": self._c, "periodic_upto_ns": int(self._pf_upto * 1e9), "update_upto": self._uf_upto}

    def restore_state(self, state: dict, version: int = STATE_VERSION) -> None:
        if version not in STATE_VERSIONS:
            raise SnapshotFormatError(f"rtc state version {version} is not one of {STATE_VERSIONS}")
        schema = {"index": int, "ram": list, "offset": int, "frozen": list}
        if version >= 2:
            schema |= {"c": int, "periodic_upto_ns": int, "update_upto": int}
        check_state(state, schema)
        ram, frozen = state["ram"], state["frozen"]
        if len(ram) != NREGS or not all(isinstance(v, int) and 0 <= v <= 0xFF for v in ram):
            raise SnapshotFormatError("rtc register state is malformed")
        if frozen and (len(frozen) != 6 or not all(isinstance(v, int) for v in frozen)):
            raise SnapshotFormatError("rtc frozen time is malformed")
        index = check_range("index", state["index"], 0, INDEX_MASK)
        c = 0
        if version >= 2:
            c = check_range("c", state["c"], 0, 0xFF)
            if c & ~(C_IRQF | C_FLAGS):
                raise SnapshotFormatError("rtc register C has bits that do not exist")
        with self.lock:
            self._index = index
            self._ram = bytearray(ram)
            self._offset = state["offset"]
            self._frozen = list(frozen) if frozen else None
            if self._frozen is None and not self._updating():
                self._frozen = list(time.gmtime(self._seconds())[:6])
            self._c = c
            wall, sec = self._now(), self._seconds()
            self._pf_upto, self._uf_upto = wall, sec
            if version >= 2:
                # What went by since (the copy, or a snapshot's shelf life) latches its flags,
                # up to the most that can matter: one tick, one day of alarm times.
                self._pf_upto = min(max(state["periodic_upto_ns"] / 1e9, wall - 1.0), wall)
                self._uf_upto = min(max(state["update_upto"], sec - SECONDS_PER_DAY), sec)
            self._last_fire = -math.inf
            # IRQF set: its edge may have left after the source's irqchip was saved (the I/O
            # thread runs while the VM is paused) and be lost, leaving IRQ 8 silent for good
            # since no new edge comes before C is read. Raise it again: at worst the guest's
            # handler runs once more and reads C = 0, as on a shared line.
            if self._c & C_IRQF:
                self._raise()
            self._rearm(self._mono())
