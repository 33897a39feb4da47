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
