#!/usr/bin/env python3
"""Live migration between two processes on one host (unix socket): pystrato vs QEMU.

    .venv/bin/python bench/migrate_vs_qemu.py [--runs 5] [--sizes 256,1024]

For 256 MiB and 1 GiB guests, mostly zero and fully written, a running source migrates to a
destination started with `-incoming unix:PATH`. Reported, min and median over the runs:
  total     the VMM's own total-time: QEMU's query-migrate; pystrato's source exits as soon as
            the migration completed (the manual), so its log line "migration completed: ...
            N ms total, M ms downtime" (the same figures query-migrate shows) is read instead;
  downtime  the VMM's own downtime. QEMU counts from the source's stop to the end of the send;
            pystrato from the source's pause to the destination's ACK (state applied, guest
            running there), which is the longer definition; a second table puts pystrato's
            pause-to-last-byte-sent (from the same log line) beside QEMU's figure;
  wall      migrate sent to the destination's query-status saying running, timed by this script
            identically for both (1 ms polling).

Guests: idle (QEMU: `-M microvm -accel kvm -nodefaults`, no kernel: the firmware finds nothing to
boot; pystrato: `-accel test`, the idle guest), so no page is dirtied during the transfer: what is
compared is the transfer itself. Fully written RAM as in snapshot_vs_qemu.py (a prefilled file
mapped MAP_PRIVATE on both sides). QEMU's max-bandwidth is raised from its 128 MiB/s default
(pystrato has no throttle); downtime limit 300 ms on both (both defaults).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    CONTENTS,
    BenchBase,
    Qmp,
    case_label,
    finish,
    parse_args,
    print_table,
    start,
    unlink,
    wait_migrate,
    wait_run_state,
)

_DONE = re.compile(r"migration completed: .* (\d+) ms total, (\d+) ms downtime \(([\d.]+) ms of it until")


class Bench(BenchBase):
    def __init__(self, workdir: str, accel: str):
        super().__init__(workdir, accel)
        self.full_tpl: dict[int, str] = {}

    def ours(self, size: int, name: str, *extra: str) -> tuple[list[str], str, str]:
        """ours_cmd with a log file (-D DIR/NAME.log): (command, QMP socket, log)."""
        log = os.path.join(self.dir, f"{name}.log")
        unlink(log)
        return (*self.ours_cmd(size, name, *extra, "-D", log), log)

    def prepare(self, size: int) -> None:
        cmd, sock, _ = self.ours(size, "prep")
        zero, self.full_tpl[size] = self.make_templates(size, cmd, sock)
        unlink(zero)

    def run_ours(self, size: int, content: str) -> tuple[float, float, float]:
        mig = os.path.join(self.dir, "p-mig.sock")
        unlink(mig)
        src_extra = ["-incoming", f"file:{self.full_tpl[size]}"] if content == "full" else []
        scmd, ssock, slog = self.ours(size, "psrc", *src_extra)
        dcmd, dsock, _ = self.ours(size, "pdst", "-incoming", f"unix:{mig}")
        ps, pd = start(scmd, env=self.env), start(dcmd, env=self.env)
        qs, qd = Qmp(ssock, ps), Qmp(dsock, pd)
        try:
            wait_run_state(qs, {"running"})
            digest = qs.cmd("x-query-memory-digest")["sha256"] if self.accel == "test" else ""
            t0 = time.perf_counter()
            qs.cmd("migrate", {"uri": f"unix:{mig}"})
            wait_run_state(qd, {"running"})
            wall = time.perf_counter() - t0
            if ps.wait(60) != 0:
                raise RuntimeError("pystrato source did not exit 0 after the migration")
            with open(slog) as f:
                m = _DONE.search(f.read())
            if m is None:
                raise RuntimeError("pystrato source logged no completed migration")
            if self.accel == "test" and qd.cmd("x-query-memory-digest")["sha256"] != digest:
                raise RuntimeError("pystrato destination memory differs from the source's")
            return int(m.group(1)) / 1000, int(m.group(2)) / 1000, wall, float(m.group(3)) / 1000
        finally:
            finish(ps, None, 5)
            finish(pd, qd)
            qs.close()

    def run_qemu(self, size: int, content: str) -> tuple[float, float, float]:
        mig = os.path.join(self.dir, "q-mig.sock")
        unlink(mig)
        scmd, ssock = self.qemu_cmd(size, "qsrc", self.qemu_memory(size, content))
        dcmd, dsock = self.qemu_cmd(size, "qdst", self.qemu_memory(size), "-incoming", f"unix:{mig}")
        ps, pd = start(scmd), start(dcmd)
        qs, qd = Qmp(ssock, ps), Qmp(dsock, pd)
        try:
            wait_run_state(qs, {"running"})
            qs.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
            while not os.path.exists(mig):  # the destination listens once its monitor is up
                time.sleep(0.001)
            t0 = time.perf_counter()
            qs.cmd("migrate", {"uri": f"unix:{mig}"})
            wait_run_state(qd, {"running"})
            wall = time.perf_counter() - t0
            info = wait_migrate(qs)
            return info["total-time"] / 1000, info["downtime"] / 1000, wall
        finally:
            finish(ps, qs)
            finish(pd, qd)


def main() -> int:
    a = parse_args(__doc__, "scratch directory (default: new dir under /tmp)")
    sizes = a.sizes
    workdir = tempfile.mkdtemp(prefix="pystrato-migbench-", dir=a.dir or "/tmp")
    b = Bench(workdir, a.accel)
    cases = [(s, c) for s in sizes for c in CONTENTS]
    res = {k: {m: [] for m in ("pt", "pd", "pw", "ps", "qt", "qd", "qw")} for k in cases}
    try:
        for s in sizes:
            b.prepare(s)
        for _ in range(2):  # warm-up, not measured
            b.run_ours(sizes[0], "zero")
            b.run_qemu(sizes[0], "zero")
        for run in range(a.runs):
            for size, content in cases:
                r = res[(size, content)]

                def ours() -> None:
                    for k, v in zip(("pt", "pd", "pw", "ps"), b.run_ours(size, content)):
                        r[k].append(v)

                def qemu() -> None:
                    for k, v in zip(("qt", "qd", "qw"), b.run_qemu(size, content)):
                        r[k].append(v)

                # Alternate who goes first: the first migration after a quiet spell is the slow one.
                for step in ((ours, qemu) if run % 2 == 0 else (qemu, ours)):
                    step()
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)
    finally:
        unlink(workdir)
    names = [(s, c, case_label(s, c)) for s, c in cases]
    print(f"pystrato (-accel {a.accel}) vs {os.path.basename(b.qemu)} (-M microvm -accel {b.qaccel}), "
          "unix socket, idle guests")
    print_table("Live migration: total time (VMM-reported)", [(n, res[(s, c)]["pt"], res[(s, c)]["qt"]) for s, c, n in names], a.runs)
    print_table("Live migration: downtime (VMM-reported)", [(n, res[(s, c)]["pd"], res[(s, c)]["qd"]) for s, c, n in names], a.runs)
    print_table("Live migration: downtime to the last byte sent (QEMU's definition; pystrato's from its log)",
                [(n, res[(s, c)]["ps"], res[(s, c)]["qd"]) for s, c, n in names], a.runs)
    print_table("Live migration: migrate to destination running (wall)", [(n, res[(s, c)]["pw"], res[(s, c)]["qw"]) for s, c, n in names], a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
