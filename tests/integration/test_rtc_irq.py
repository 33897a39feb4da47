"""rtc guest: the CMOS clock's update-ended, alarm and periodic interrupts reach the guest on
IRQ 8 through the IOAPIC, and reading register C clears it. Counts only: the RTC seconds the
guest reports come from the device itself, no host time is measured."""

from __future__ import annotations

import re

import pytest

from domain.devices.rtc import MAX_TIMER_HZ

pytestmark = pytest.mark.kvm


def _fields(line: str) -> dict[str, int]:
    return {k: int(v, 16 if k in ("first", "second") else 10) for k, v in re.findall(r"(\w+)=(\w+)", line)}


def _run(vm, guest, append: str) -> dict[str, dict[str, int]]:
    v = vm(guest("rtc"), append)
    assert v.wait_exit(120) == 0, v.stderr
    assert "Traceback" not in v.stderr and "EXCEPTION" not in v.output, v.output + v.stderr
    lines = {m.group(1): _fields(m.group(2)) for m in re.finditer(r"^rtc: (\w+) ?(.*)$", v.output, re.M)}
    assert "done" in lines, v.output
    return lines


def test_update_alarm_and_periodic_interrupts_arrive_and_c_clears(vm, guest):
    out = _run(vm, guest, "seconds=4")
    uie, aie, pie, c = out["uie"], out["aie"], out["pie"], out["c"]
    # One update-ended interrupt per RTC second, each showing UF and IRQF in C.
    assert uie["uf"] == 4 and uie["irqs"] == 4 and uie["spurious"] == 0
    # (elapsed is read after the last interrupt: one more second allows for a host that runs the
    # I/O thread late under load; flags coalesce then, they are not counters.)
    assert abs(uie["elapsed"] - uie["uf"]) <= 2, uie
    # The alarm, set 2 RTC seconds ahead with a don't-care hour, fires once and at its time.
    assert aie["af"] == 1 and aie["irqs"] == 1 and aie["spurious"] == 0
    assert 2 <= aie["after"] <= 4, aie  # never early; late only by the host's latency
    # 1024 Hz periodic interrupts for one RTC second: some arrive, never above the timer cap
    # (plus the one that shows the guest the second turned).
    assert 0 < pie["pf"] == pie["irqs"] <= MAX_TIMER_HZ + 1 and pie["spurious"] == 0
    # Reading C returns the flags latched since (PF, as the rate was still set) and clears them.
    assert c["first"] & 0x80 == 0 and c["second"] == 0, c


def test_8192_hz_is_coalesced_and_2_hz_is_counted(vm, guest):
    fast = _run(vm, guest, "seconds=1 rate=3")["pie"]
    assert 0 < fast["pf"] <= MAX_TIMER_HZ + 1 and fast["spurious"] == 0
    slow = _run(vm, guest, "seconds=1 rate=15")["pie"]
    assert 2 <= slow["pf"] <= 3 and slow["spurious"] == 0


def test_update_interrupts_continue_after_live_migration(vm, guest, tmp_path):
    from tests.integration.test_kvm_migration import source_done, wait_migrate

    uri = f"unix:{tmp_path}/migrate.sock"
    src = vm(guest("rtc"), "ticks", name="src")
    src.wait_line(r"^rtc: tick 2 ")
    dst = vm(guest("rtc"), "ticks", "-incoming", uri, name="dst")
    assert dst.command("query-status")[0]["status"] == "inmigrate"
    assert src.command("migrate", {"uri": uri})[0] == {}
    source_done(src)
    assert wait_migrate(dst) == {"status": "completed"}, dst.stderr
    # The guest goes on counting where it was: its interrupts come from the destination's RTC.
    first = int(dst.wait_line(r"^rtc: tick (\d+) ")[0].group(1))
    assert first > 2 and "rtc: start" not in dst.output
    dst.wait_line(rf"^rtc: tick {first + 2} ")
    dst.command("quit")
    assert dst.wait_exit() == 0
