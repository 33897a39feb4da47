import calendar

import pytest

from domain.devices import rtc as r
from domain.devices.rtc import CmosRtc
from domain.errors import SnapshotFormatError

# 2024-02-29 23:59:58 UTC, a Thursday
T0 = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0))


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def make(t=T0):
    clock = Clock(t)
    return CmosRtc(clock), clock


def rd(dev, reg):
    dev.write(r.INDEX, memoryview(bytes([reg])))
    buf = bytearray(1)
    dev.read(r.DATA, memoryview(buf))
    return buf[0]


def wr(dev, reg, value):
    dev.write(r.INDEX, memoryview(bytes([reg])))
    dev.write(r.DATA, memoryview(bytes([value])))


def test_time_registers_are_the_host_clock_in_bcd_24h_by_default():
    dev, _ = make()
    assert [rd(dev, reg) for reg in (r.REG_SECONDS, r.REG_MINUTES, r.REG_HOURS, r.REG_DAY,
                                     r.REG_MONTH, r.REG_YEAR, r.REG_CENTURY)] == \
        [0x58, 0x59, 0x23, 0x29, 0x02, 0x24, 0x20]
    assert rd(dev, r.REG_WEEKDAY) == 5  # Thursday, Sunday = 1


def test_clock_follows_the_host_across_midnight_and_month_end():
    dev, clock = make()
    clock.t += 3
    assert (rd(dev, r.REG_SECONDS), rd(dev, r.REG_HOURS), rd(dev, r.REG_DAY), rd(dev, r.REG_MONTH)) == \
        (0x01, 0x00, 0x01, 0x03)


def test_update_never_in_progress_and_battery_valid():
    dev, _ = make()
    assert rd(dev, r.REG_A) == r.A_DEFAULT and not rd(dev, r.REG_A) & r.A_UIP
    wr(dev, r.REG_A, 0xA6)  # UIP is read-only
    assert rd(dev, r.REG_A) == 0x26
    assert rd(dev, r.REG_B) == r.B_24H
    assert rd(dev, r.REG_D) == r.D_VRT
    wr(dev, r.REG_D, 0)
    assert rd(dev, r.REG_D) == r.D_VRT
    assert rd(dev, r.REG_C) == 0


def test_binary_and_12_hour_modes():
    dev, clock = make()
    wr(dev, r.REG_B, r.B_DM_BINARY)  # binary, 12-hour
    assert rd(dev, r.REG_SECONDS) == 58 and rd(dev, r.REG_YEAR) == 24
    assert rd(dev, r.REG_HOURS) == 11 | r.HOUR_PM
    clock.t += 2  # 00:00:00 is 12 AM
    assert rd(dev, r.REG_HOURS) == 12
    clock.t += 13 * 3600  # 13:00 is 1 PM
    assert rd(dev, r.REG_HOURS) == 1 | r.HOUR_PM


def test_guest_sets_the_time_under_set_and_it_keeps_running_from_there():
    dev, clock = make()
    wr(dev, r.REG_B, r.B_24H | r.B_SET)
    clock.t += 100  # frozen while SET
    assert rd(dev, r.REG_SECONDS) == 0x58
    for reg, v in ((r.REG_YEAR, 0x31), (r.REG_MONTH, 0x12), (r.REG_DAY, 0x31), (r.REG_HOURS, 0x22),
                   (r.REG_MINUTES, 0x30), (r.REG_SECONDS, 0x15)):
        wr(dev, reg, v)
    assert rd(dev, r.REG_HOURS) == 0x22
    wr(dev, r.REG_B, r.B_24H)
    clock.t += 5
    assert [rd(dev, reg) for reg in (r.REG_YEAR, r.REG_MONTH, r.REG_DAY, r.REG_HOURS, r.REG_MINUTES,
                                     r.REG_SECONDS)] == [0x31, 0x12, 0x31, 0x22, 0x30, 0x20]
    assert rd(dev, r.REG_CENTURY) == 0x20


def test_write_without_set_moves_the_clock_at_once():
    dev, clock = make()
    wr(dev, r.REG_MINUTES, 0x10)
    assert rd(dev, r.REG_MINUTES) == 0x10 and rd(dev, r.REG_HOURS) == 0x23
    clock.t += 60
    assert rd(dev, r.REG_MINUTES) == 0x11


def test_12_hour_write():
    dev, _ = make()
    wr(dev, r.REG_B, 0)  # BCD, 12-hour
    wr(dev, r.REG_HOURS, 0x12)  # 12 AM
    wr(dev, r.REG_B, r.B_24H)
    assert rd(dev, r.REG_HOURS) == 0x00
    wr(dev, r.REG_B, 0)
    wr(dev, r.REG_HOURS, 0x07 | r.HOUR_PM)
    wr(dev, r.REG_B, r.B_24H)
    assert rd(dev, r.REG_HOURS) == 0x19


def test_nonsense_written_dates_do_not_break_the_clock():
    dev, _ = make()
    wr(dev, r.REG_B, r.B_24H | r.B_SET)
    wr(dev, r.REG_MONTH, 0x02)
    wr(dev, r.REG_DAY, 0x31)  # 31 February
    rd(dev, r.REG_WEEKDAY)
    wr(dev, r.REG_MONTH, 0x99)
    wr(dev, r.REG_B, r.B_24H)
    assert 1 <= int(f"{rd(dev, r.REG_MONTH):x}") <= 12


def test_nvram_and_alarm_registers_are_storage_and_index_drops_the_nmi_bit():
    dev, _ = make()
    wr(dev, 0x0E, 0xAB)
    wr(dev, 0x7F, 0xCD)
    wr(dev, r.REG_SECONDS_ALARM, 0x42)
    assert rd(dev, 0x0E) == 0xAB and rd(dev, 0x7F) == 0xCD and rd(dev, r.REG_SECONDS_ALARM) == 0x42
    assert rd(dev, 0x80 | 0x0E) == 0xAB  # NMI-disable bit set on the index
    buf = bytearray(1)
    dev.read(r.INDEX, memoryview(buf))
    assert buf[0] == 0xFF


def test_linux_does_rtc_work_sequence_succeeds_first_try():
    """mc146818_avoid_UIP: seconds, UIP clear, seconds again unchanged."""
    dev, _ = make()
    s = rd(dev, r.REG_SECONDS)
    assert not rd(dev, r.REG_A) & r.A_UIP
    assert rd(dev, r.REG_SECONDS) == s


def test_snapshot_round_trip_keeps_the_guest_offset():
    dev, _ = make()
    wr(dev, r.REG_YEAR, 0x30)
    wr(dev, 0x20, 0x77)
    state = dev.save_state()
    other, _ = make(T0 + 10)
    other.restore_state(state)
    assert rd(other, r.REG_YEAR) == 0x30 and rd(other, 0x20) == 0x77
    assert rd(other, r.REG_SECONDS) == 0x08  # the host clock moved on by 10 s


@pytest.mark.parametrize("bad", [
    None, {}, {"index": 0, "ram": [0] * 10, "offset": 0, "frozen": []},
    {"index": 0, "ram": [300] * 128, "offset": 0, "frozen": []},
    {"index": 200, "ram": [0] * 128, "offset": 0, "frozen": []},
    {"index": 0, "ram": [0] * 128, "offset": 0, "frozen": [1, 2]},
])
def test_bad_snapshot_state_is_refused(bad):
    dev, _ = make()
    with pytest.raises(SnapshotFormatError):
        dev.restore_state(bad)


# --- interrupts ----------------------------------------------------------------------------------
# One fake time drives both clocks: monotonic = t, host UNIX time = T0 + t (T0 is a whole second,
# so the guest's seconds turn over at whole t).


M = r.DEADLINE_MARGIN  # timers are set this far past the tick or second they wait for


def at(t):
    return pytest.approx(t + M, abs=1e-6)


class FakeTimer:
    def __init__(self):
        self.pending: dict[object, tuple[float, object]] = {}
        self.armed = 0

    def call_at(self, deadline, callback):
        handle = object()
        self.pending[handle] = (deadline, callback)
        self.armed += 1
        return handle

    def cancel(self, handle):
        self.pending.pop(handle, None)

    def deadline(self):
        return min((d for d, _ in self.pending.values()), default=None)


class Rig:
    """An RTC with a fake clock, a fake timer and a counting trigger; ``handler`` (if set) runs
    on each interrupt, as a guest's IRQ 8 handler would."""

    def __init__(self, t=0.0):
        self.t = t
        self.timer = FakeTimer()
        self.irqs = 0
        self.fired_at: list[float] = []
        self.handler = None
        self.dev = CmosRtc(lambda: T0 + self.t, timer=self.timer, trigger=self._irq, monotonic=lambda: self.t)

    def _irq(self):
        self.irqs += 1
        self.fired_at.append(self.t)
        if self.handler is not None:
            self.handler()

    def run_until(self, t):
        """Advance time to t, firing each timer as its deadline comes (as the I/O thread would:
        with the device lock taken by the callback itself)."""
        while True:
            due = [(d, h) for h, (d, _) in self.timer.pending.items() if d <= t]
            if not due:
                break
            deadline, handle = min(due, key=lambda e: e[0])
            _, callback = self.timer.pending.pop(handle)
            self.t = max(self.t, deadline)
            callback()
        self.t = max(self.t, t)

    def rd(self, reg):
        with self.dev.lock:  # the bus holds the device lock around every access
            return rd(self.dev, reg)

    def wr(self, reg, value):
        with self.dev.lock:
            wr(self.dev, reg, value)


@pytest.mark.parametrize("rate,hz", [(0, None), (1, 256), (2, 128), (3, 8192), (4, 4096), (6, 1024),
                                     (7, 512), (13, 8), (15, 2), (0x26, 1024)])
def test_periodic_rate_table(rate, hz):
    period = r.periodic_period(rate)
    assert (period is None) if hz is None else period == pytest.approx(1 / hz)


def test_nothing_is_scheduled_while_no_enabled_source_needs_it():
    rig = Rig()
    assert rig.timer.armed == 0  # default: 1024 Hz rate, no enables
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    assert rig.timer.deadline() is not None
    rig.wr(r.REG_B, r.B_24H)
    assert rig.timer.pending == {}
    rig.wr(r.REG_A, 0x20)  # rate 0: PIE has nothing to tick
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    assert rig.timer.pending == {}
    rig.wr(r.REG_A, 0x70 | 0x06)  # dividers in reset: neither ticks nor updates
    rig.wr(r.REG_B, r.B_24H | r.B_PIE | r.B_UIE | r.B_AIE)
    assert rig.timer.pending == {}
    rig.wr(r.REG_A, r.A_DEFAULT)
    rig.wr(r.REG_B, r.B_24H | r.B_SET | r.B_UIE | r.B_AIE)  # SET: no updates, so no UF or AF
    assert rig.timer.pending == {}
    rig.run_until(5.0)
    assert rig.irqs == 0


def test_periodic_flag_latches_even_without_pie_and_reading_c_clears_it():
    rig = Rig()
    assert rig.rd(r.REG_C) == 0
    rig.run_until(0.5 / 1024)
    assert rig.rd(r.REG_C) == 0  # no tick yet
    rig.run_until(1.0 / 1024)
    assert rig.rd(r.REG_C) == r.C_PF  # no IRQF: PIE is off
    assert rig.rd(r.REG_C) == 0
    rig.run_until(10.0 / 1024)  # ten ticks: one flag
    assert rig.rd(r.REG_C) == r.C_PF
    assert rig.irqs == 0 and rig.timer.armed == 0


def test_pie_raises_one_edge_until_c_is_read():
    rig = Rig()
    rig.wr(r.REG_A, 0x20 | 15)  # 2 Hz
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    assert rig.timer.deadline() == at(0.5)
    rig.run_until(0.5 + M)
    assert rig.irqs == 1
    assert rig.timer.pending == {}  # IRQF is up: nothing more to raise until C is read
    rig.run_until(3.0)
    assert rig.irqs == 1
    # the seconds turned twice (UF) and passed 00:00:00, what the alarm registers hold at reset (AF)
    assert rig.rd(r.REG_C) == r.C_IRQF | r.C_PF | r.C_UF | r.C_AF
    assert rig.timer.deadline() == at(3.5)  # the next tick, on the same phase
    rig.run_until(3.5 + M)
    assert rig.irqs == 2 and rig.rd(r.REG_C) == r.C_IRQF | r.C_PF


def test_a_guest_handler_reading_c_gets_every_tick_at_a_slow_rate():
    rig = Rig()
    flags = []
    rig.handler = lambda: flags.append(rd(rig.dev, r.REG_C))  # the callback holds the lock
    rig.wr(r.REG_A, 0x20 | 9)  # 128 Hz
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    rig.run_until(1.0 - 1e-9)
    assert rig.irqs == 127
    assert all(f & (r.C_IRQF | r.C_PF) == r.C_IRQF | r.C_PF for f in flags)


def test_8192_hz_is_coalesced_to_the_timer_cap():
    rig = Rig()
    rig.handler = lambda: rd(rig.dev, r.REG_C)
    rig.wr(r.REG_A, 0x20 | 3)  # 8192 Hz
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    rig.run_until(1.0)
    assert r.MAX_TIMER_HZ - 2 <= rig.irqs <= r.MAX_TIMER_HZ + 1
    gaps = [b - a for a, b in zip(rig.fired_at, rig.fired_at[1:])]
    assert min(gaps) >= r.MIN_TIMER_INTERVAL - 1e-9


def test_a_late_timer_raises_once_and_does_not_catch_up_in_a_burst():
    rig = Rig()
    rig.handler = lambda: rd(rig.dev, r.REG_C)
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)  # 1024 Hz
    (deadline, callback), = rig.timer.pending.values()
    rig.timer.pending.clear()
    rig.t = deadline + 0.25  # the I/O thread was stuck for 256 ticks
    callback()
    assert rig.irqs == 1
    assert rig.timer.deadline() > rig.t  # the next tick after now, not the missed ones


def test_stale_timer_callback_does_nothing():
    rig = Rig()
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    (_, stale), = rig.timer.pending.values()
    rig.wr(r.REG_B, r.B_24H)  # cancelled, but the callback may already be on its way
    rig.t = 1.0
    stale()
    assert rig.irqs == 0 and rig.timer.pending == {}


def test_update_ended_interrupt_once_a_second():
    rig = Rig(0.25)
    rig.wr(r.REG_B, r.B_24H | r.B_UIE)
    assert rig.timer.deadline() == at(1.0)  # the next turn of the seconds
    rig.run_until(0.99)
    assert rig.irqs == 0
    rig.run_until(1.0 + M)
    assert rig.irqs == 1
    assert rig.rd(r.REG_C) == r.C_IRQF | r.C_UF | r.C_PF  # PF latched meanwhile, PIE off
    assert rig.rd(r.REG_SECONDS) == 0x59
    rig.handler = lambda: rd(rig.dev, r.REG_C)
    rig.run_until(10.5)
    assert rig.irqs == 10
    assert rig.fired_at[1:] == [pytest.approx(k + M) for k in range(2, 11)]


def test_update_flag_latches_without_uie_and_set_stops_it():
    rig = Rig()
    rig.run_until(1.0)
    assert rig.rd(r.REG_C) & r.C_UF
    rig.wr(r.REG_B, r.B_24H | r.B_SET)
    rig.run_until(3.0)
    assert not rig.rd(r.REG_C) & r.C_UF
    rig.wr(r.REG_B, r.B_24H)  # resuming is not an update
    assert not rig.rd(r.REG_C) & r.C_UF
    rig.run_until(4.0)
    assert rig.rd(r.REG_C) & r.C_UF


def test_alarm_with_dont_care_hours_and_minutes_fires_once_at_its_second():
    rig = Rig()  # 23:59:58
    rig.wr(r.REG_HOURS_ALARM, 0xC0)
    rig.wr(r.REG_MINUTES_ALARM, 0xFF)
    rig.wr(r.REG_SECONDS_ALARM, 0x05)
    rig.wr(r.REG_B, r.B_24H | r.B_AIE)
    assert rig.timer.deadline() == at(7.0)  # 00:00:05
    rig.run_until(6.999)
    assert rig.irqs == 0
    assert rig.rd(r.REG_C) & r.C_AF == 0
    rig.run_until(7.0 + M)
    assert rig.irqs == 1
    assert rig.rd(r.REG_C) == r.C_IRQF | r.C_AF | r.C_UF | r.C_PF
    assert rig.timer.deadline() == at(67.0)  # 00:01:05: once a minute
    rig.run_until(66.0)
    assert rig.irqs == 1 and not rig.rd(r.REG_C) & r.C_AF


def test_alarm_at_an_exact_time_and_in_12_hour_binary_mode():
    rig = Rig()
    rig.wr(r.REG_B, r.B_DM_BINARY)  # binary, 12-hour
    rig.wr(r.REG_HOURS_ALARM, 12)  # 12 AM
    rig.wr(r.REG_MINUTES_ALARM, 0)
    rig.wr(r.REG_SECONDS_ALARM, 1)
    rig.wr(r.REG_B, r.B_DM_BINARY | r.B_AIE)
    assert rig.timer.deadline() == at(3.0)  # 00:00:01
    rig.run_until(3.0 + M)
    assert rig.irqs == 1 and rig.rd(r.REG_C) & r.C_AF
    assert rig.timer.deadline() == at(3.0 + 86400)


def test_alarm_flag_latches_for_a_passed_alarm_without_aie():
    rig = Rig()
    for reg, v in ((r.REG_HOURS_ALARM, 0x00), (r.REG_MINUTES_ALARM, 0x00), (r.REG_SECONDS_ALARM, 0x00)):
        rig.wr(reg, v)
    rig.run_until(1.5)
    assert not rig.rd(r.REG_C) & r.C_AF
    rig.run_until(3600.0)  # 00:00:00 went by, unobserved
    assert rig.rd(r.REG_C) & r.C_AF
    assert rig.timer.armed == 0


def test_an_alarm_no_time_matches_arms_nothing():
    rig = Rig()
    rig.wr(r.REG_SECONDS_ALARM, 0x99)  # 99 s in BCD, and not a don't-care value
    rig.wr(r.REG_B, r.B_24H | r.B_AIE)
    assert rig.timer.pending == {}
    rig.run_until(200.0)
    assert not rig.rd(r.REG_C) & r.C_AF


def test_enabling_a_source_whose_flag_is_latched_raises_at_once():
    rig = Rig()
    rig.run_until(0.01)
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    assert rig.irqs == 1
    assert rig.rd(r.REG_C) == r.C_IRQF | r.C_PF


def test_setting_the_clock_is_not_an_update_and_moves_the_alarm():
    rig = Rig()
    rig.wr(r.REG_HOURS_ALARM, 0x12)
    rig.wr(r.REG_MINUTES_ALARM, 0x00)
    rig.wr(r.REG_SECONDS_ALARM, 0x00)
    rig.wr(r.REG_B, r.B_24H | r.B_AIE)
    assert rig.timer.deadline() == at(2.0 + 12 * 3600)
    rig.wr(r.REG_HOURS, 0x11)  # now 11:59:58
    rig.wr(r.REG_MINUTES, 0x59)
    assert not rig.rd(r.REG_C) & r.C_UF
    assert rig.timer.deadline() == at(2.0)
    rig.run_until(2.0 + M)
    assert rig.irqs == 1 and rig.rd(r.REG_C) & r.C_AF


def test_dividers_in_reset_hold_the_time_and_the_ticks():
    rig = Rig()
    rig.wr(r.REG_A, 0x70 | 0x06)
    rig.run_until(5.0)
    assert rig.rd(r.REG_SECONDS) == 0x58 and rig.rd(r.REG_C) == 0
    rig.wr(r.REG_A, r.A_DEFAULT)
    rig.run_until(6.0)
    assert rig.rd(r.REG_SECONDS) == 0x59


def test_interrupt_state_round_trip_keeps_the_tick_phase():
    rig = Rig()
    rig.wr(r.REG_A, 0x20 | 15)  # 2 Hz
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    rig.run_until(0.2)
    state = rig.dev.save_state()
    other = Rig(100.2)
    other.dev.restore_state(state)
    assert other.rd(r.REG_B) == r.B_24H | r.B_PIE
    # ticks fall on the clock's half seconds at the destination too; the 100 s in between
    # latched PF (the read of C above cleared it, raising nothing: PIE's edge was on its way)
    assert other.timer.deadline() == at(100.5)
    other.run_until(100.5 + M)
    assert other.irqs == 1 and other.rd(r.REG_C) & r.C_PF


def test_saved_state_does_not_change_while_nothing_looks_at_the_flags():
    """Migration collects the device state twice with the VM stopped and wants them equal."""
    rig = Rig()
    rig.wr(r.REG_B, r.B_24H | r.B_PIE)
    first = rig.dev.save_state()
    rig.t += 0.75  # the timer has not run: the I/O thread is slow
    assert rig.dev.save_state() == first


def test_restored_flags_and_owed_updates_carry_over():
    rig = Rig()
    rig.wr(r.REG_B, r.B_24H | r.B_UIE)
    rig.run_until(1.0 + M)
    assert rig.irqs == 1  # IRQF up, unread
    state = rig.dev.save_state()
    assert state["c"] & r.C_IRQF and state["update_upto"] == T0 + 1
    other = Rig(2.5)  # one more update went by, to 00:00:00 (the reset alarm registers' time)
    other.dev.restore_state(state)
    # The edge may have been lost between the irqchip's save and this one: raised again.
    assert other.irqs == 1 and other.timer.pending == {}
    assert other.rd(r.REG_C) == r.C_IRQF | r.C_UF | r.C_PF | r.C_AF


def test_a_restored_alarm_that_went_by_in_between_latches_af():
    rig = Rig()
    for reg in (r.REG_HOURS_ALARM, r.REG_MINUTES_ALARM):
        rig.wr(reg, 0xC0)
    rig.wr(r.REG_SECONDS_ALARM, 0x30)
    rig.rd(r.REG_C)
    state = rig.dev.save_state()
    other = Rig(40.0)  # 00:00:38: second 30 went by
    other.dev.restore_state(state)
    assert other.rd(r.REG_C) & r.C_AF


def test_version_1_state_still_restores():
    rig = Rig()
    v1 = {k: v for k, v in rig.dev.save_state().items() if k in ("index", "ram", "offset", "frozen")}
    v1["ram"][r.REG_B] = r.B_24H | r.B_UIE
    other = Rig(7.25)
    other.dev.restore_state(v1, 1)
    assert other.rd(r.REG_C) == 0 and other.timer.deadline() == at(8.0)
    with pytest.raises(SnapshotFormatError):
        other.dev.restore_state(v1)  # version 2 needs the interrupt fields


@pytest.mark.parametrize("field,value", [("c", 0x01), ("c", 0x100), ("c", "x"), ("c", None),
                                         ("periodic_upto_ns", 1.5), ("update_upto", None)])
def test_bad_interrupt_state_is_refused(field, value):
    rig = Rig()
    state = rig.dev.save_state()
    state[field] = value
    with pytest.raises(SnapshotFormatError):
        rig.dev.restore_state(state)


def test_unknown_state_version_is_refused():
    rig = Rig()
    with pytest.raises(SnapshotFormatError):
        rig.dev.restore_state(rig.dev.save_state(), 3)


@pytest.mark.parametrize("tod,alarm,want", [
    (0, (None, None, None), 1),
    (59, (None, None, 0), 1),
    (5, (None, None, 5), 60),
    (3600 * 23 + 3599, (0, 0, 0), 1),
    (10, (0, 0, 10), 86400),
    (3600 * 5, (4, None, None), 23 * 3600),
    (3600 * 4 + 59 * 60 + 59, (4, None, None), 23 * 3600 + 1),
    (3600 * 4 + 30 * 60, (4, None, None), 1),
])
def test_next_alarm(tod, alarm, want):
    assert r.next_alarm(tod, alarm) == want
