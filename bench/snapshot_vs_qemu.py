#!/usr/bin/env python3
"""Memory snapshot (save) and restore: pystrato vs QEMU on the same host, same run, same disk.

    .venv/bin/python bench/snapshot_vs_qemu.py [--runs 5] [--sizes 256,1024] [--dir DIR]

For 256 MiB and 1 GiB guests, mostly zero and fully written:
  save     pystrato: `stop`, then `migrate file:DIR` (DIR/memory + DIR/state), until query-migrate
           says completed.  QEMU 7.2 (no file: URI yet): `-S`, `migrate exec:cat > F`, until
           completed; max-bandwidth raised first, as libvirt does for a save to file (QEMU's
           default 128 MiB/s throttle is meant for live migration, not for snapshots).
  restore  from exec until query-status says running. pystrato: `-incoming file:DIR` (runs by
           itself). QEMU: `-incoming "exec:cat F"`, then `cont` once the load is over.

"Fully written" guest RAM, the same for both: every page non-zero (a random 16 MiB pattern,
repeated). QEMU's source maps a prefilled file as its RAM (`memory-backend-file,share=off`,
i.e. MAP_PRIVATE); pystrato's source is restored from a snapshot whose memory file is that
pattern (also MAP_PRIVATE), with the idle guest's code page kept so the guest still runs.
Mostly zero: a fresh guest (QEMU: never started, -S; pystrato: the idle guest, then stopped).
QEMU uses KVM (`-M microvm -accel kvm -nodefaults`); pystrato uses `-accel test` by default (the
snapshot engine does not depend on the hypervisor; --accel kvm to change that).
Files of both go to the same directory (default: a new one under /tmp). pystrato fsyncs its
snapshot files before reporting completed (a template must survive a crash); QEMU's `cat > F`
does not, which this benchmark leaves as it is (--dir /dev/shm shows the two without the disk).
pystrato runs with its bytecode cached, as installed (see _common.pystrato_env). One warm-up
round is not measured; runs are interleaved so drift hits both alike.
"""

from __future__ import annotations

import os
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


class Bench(BenchBase):
    def __init__(self, workdir: str, accel: str):
        super().__init__(workdir, accel)
        self.templates: dict[tuple[int, str], str | None] = {}
        self.digests: dict[tuple[int, str], str] = {}

    # --- pystrato ------------------------------------------------------------------------------

    def prepare(self, size: int) -> None:
        """Template snapshots: a fresh guest's, and the same with every page written."""
        cmd, sock = self.ours_cmd(size, "p")
        _, full = self.make_templates(size, cmd, sock)
        self.templates[(size, "zero")] = None  # a fresh VM
        self.templates[(size, "full")] = full

    def ours_save(self, size: int, content: str) -> tuple[float, str]:
        tpl = self.templates[(size, content)]
        cmd, sock = self.ours_cmd(size, "p", *(["-incoming", f"file:{tpl}"] if tpl else []))
        out = os.path.join(self.dir, f"out-{size}-{content}")
        unlink(out)
        os.mkdir(out)
        p = start(cmd, env=self.env)
        q = Qmp(sock, p)
        wait_run_state(q, {"running"})
        q.cmd("stop")
        t0 = time.perf_counter()
        q.cmd("migrate", {"uri": f"file:{out}"})
        wait_migrate(q)
        elapsed = time.perf_counter() - t0
        self.digests[(size, content)] = q.cmd("x-query-memory-digest")["sha256"] if self.accel == "test" else ""
        finish(p, q)
        return elapsed, out

    def ours_restore(self, size: int, content: str, snap: str) -> float:
        cmd, sock = self.ours_cmd(size, "p", "-incoming", f"file:{snap}")
        t0 = time.perf_counter()
        p = start(cmd, env=self.env)
        q = Qmp(sock, p)
        wait_run_state(q, {"running"})
        elapsed = time.perf_counter() - t0
        if self.accel == "test":  # not timed: the restored guest has the saved memory
            got = q.cmd("x-query-memory-digest")["sha256"]
            if got != self.digests[(size, content)]:
                sys.exit(f"pystrato restore of {size} MiB {content}: memory digest differs")
        finish(p, q)
        return elapsed

    # --- QEMU ----------------------------------------------------------------------------------

    def qemu_save(self, size: int, content: str) -> tuple[float, str]:
        cmd, sock = self.qemu_cmd(size, "q", self.qemu_memory(size, content), "-S")
        out = os.path.join(self.dir, f"qemu-{size}-{content}.mig")
        unlink(out)
        p = start(cmd)
        q = Qmp(sock, p)
        q.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        t0 = time.perf_counter()
        q.cmd("migrate", {"uri": f"exec:cat > {out}"})
        wait_migrate(q)
        elapsed = time.perf_counter() - t0
        finish(p, q)
        return elapsed, out

    def qemu_restore(self, size: int, path: str) -> float:
        cmd, sock = self.qemu_cmd(size, "q", self.qemu_memory(size), "-incoming", f"exec:cat {path}")
        t0 = time.perf_counter()
        p = start(cmd)
        q = Qmp(sock, p)
        wait_run_state(q, {"prelaunch", "paused", "running"})  # the load is over
        q.cmd("cont")
        wait_run_state(q, {"running"})
        elapsed = time.perf_counter() - t0
        finish(p, q)
        return elapsed


def main() -> int:
    a = parse_args(__doc__, "where both write their files (default: new dir under /tmp)")
    sizes = a.sizes
    workdir = tempfile.mkdtemp(prefix="pystrato-snapbench-", dir=a.dir or "/tmp")
    b = Bench(workdir, a.accel)
    cases = [(s, c) for s in sizes for c in CONTENTS]
    res = {k: {"ps": [], "pr": [], "qs": [], "qr": []} for k in cases}
    try:
        for s in sizes:
            b.prepare(s)
        # Warm-up, not measured: bytecode cache, QEMU's binary and libraries in the page cache.
        for _ in range(2):
            _, snap = b.ours_save(sizes[0], "zero")
            b.ours_restore(sizes[0], "zero", snap)
            _, f = b.qemu_save(sizes[0], "zero")
            b.qemu_restore(sizes[0], f)
        for run in range(a.runs):
            for size, content in cases:
                r = res[(size, content)]

                def ours() -> None:
                    t, snap = b.ours_save(size, content)
                    r["ps"].append(t)
                    r["pr"].append(b.ours_restore(size, content, snap))
                    unlink(snap)

                def qemu() -> None:
                    t, f = b.qemu_save(size, content)
                    r["qs"].append(t)
                    r["qr"].append(b.qemu_restore(size, f))
                    unlink(f)

                for step in ((ours, qemu) if run % 2 == 0 else (qemu, ours)):  # alternate who goes first
                    step()
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)
    finally:
        unlink(workdir)
    print(f"pystrato (-accel {a.accel}) vs {os.path.basename(b.qemu)} (-M microvm -accel {b.qaccel}); "
          f"files under {a.dir or '/tmp'}")
    print_table("Snapshot save (migrate to file)",
                [(case_label(s, c), res[(s, c)]["ps"], res[(s, c)]["qs"]) for s, c in cases],
                a.runs)
    print_table("Restore (exec to running)",
                [(case_label(s, c), res[(s, c)]["pr"], res[(s, c)]["qr"]) for s, c in cases],
                a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
