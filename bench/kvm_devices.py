#!/usr/bin/env python3
"""Device-path costs on real KVM, measured with the test guests (tests/guests), as ratios.

    .venv/bin/python bench/kvm_devices.py [--runs 3] [--exits 50000] [--mib 64] [--depths 1,8]

PIO exit: the `pio` guest runs N `out` instructions to a port nobody claims, each a full exit
through pystrato's vCPU thread and port bus; the host times it from the guest's start line to its
done line, and reads the vCPU thread's CPU time (/proc, thread id from query-cpus) around it. The
reference is a bare Python loop driving KVM_RUN over the same guest loop in a VM set up the same
way (in-kernel irqchip, CPUID, MSRs), nothing dispatched; for scale, an empty Python loop of N
iterations. On a loaded host the wall time mostly measures how much CPU the vCPU thread gets;
the CPU-time row compares the work done per exit.

virtio-blk: the `virtio_blk` guest moves --mib MiB in sequential 64 KiB requests (depth requests
in flight) through its own virtio-mmio driver; the reference is os.pwritev/os.preadv of 64 KiB
at a time on the same file from this process, with the same O_DIRECT setting, through as many
buffers as the guest keeps in flight. The guest times
its request loop with rdtsc and the host turns that into seconds with KVM_GET_TSC_KHZ: the
serial lines around the loop are printed by emulated ring-0 code (~3 ms for the done line
here), which at page-cache speed would be a fifth of a 64 MiB run; their timing is shown too. By default the
guest's request loop runs in ring 3 and polls the used ring with interrupts suppressed
(--ring 3 --wait poll), as a user-space polled driver (SPDK) does: kvm-pvm runs a guest's ring-0
code in its instruction emulator (a two-instruction loop: ~1.5 µs per iteration in ring 0, ~4 ns
in ring 3), which would make the guest's own work per request, not the device path, the figure.
--ring 0 --wait irq is the way a guest kernel waits for its disk (hlt until the used-buffer
interrupt), every instruction of it emulated here.

Prints a Markdown table of ratios (goals from issue 4: exit <= 1.2x bare, block >= 0.8x host).
Numbers depend on the host: on kvm-pvm (nested, shadow paging) everything is slower.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.guests.build import build_guest  # noqa: E402
from tests.integration.guestvm import GuestVm  # noqa: E402

BS = 64 << 10
MIB = 1 << 20


# --- PIO exits ---------------------------------------------------------------------------------

PORT = 0x510  # the pio guest's default: nothing claims it


def _thread_cpu(pid: int, tid: int) -> float:
    """utime + stime of one thread, in seconds."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pio_pystrato(workdir: Path, n: int) -> tuple[float, float]:
    """(wall seconds, vCPU-thread CPU seconds) per exit inside pystrato."""
    v = GuestVm(workdir, build_guest("pio"), f"gate n={n} port={PORT:#x}", name="pio")
    try:
        cpus, _ = v.command("query-cpus")
        tid = cpus[0]["thread_id"]
        v.send_serial(b"g")
        _, t0 = v.wait_line(r"^pio: start", timeout=120)
        c0 = _thread_cpu(v.proc.pid, tid)
        _, t1 = v.wait_line(r"^pio: done", timeout=600)
        try:
            c1 = _thread_cpu(v.proc.pid, tid)
        except FileNotFoundError:  # the guest ends right after its done line
            raise RuntimeError("the VMM exited before its vCPU's CPU time was read: use more --exits") from None
        v.wait_exit(60)
    finally:
        v.close()
    return (t1 - t0) / n, (c1 - c0) / n


def _out_loop(n: int) -> bytes:
    """mov ecx, n; 1: out dx, al; dec rcx; jnz 1b; out 0x81, al; jmp $ (dx = PORT): the loop
    instructions of the pio test guest (tests/guests/src/pio.c), so both run the same guest code."""
    body = b"\xee" + b"\x48\xff\xc9"
    return (b"\x66\xba" + PORT.to_bytes(2, "little") + b"\xb9" + n.to_bytes(4, "little") + body
            + b"\x75" + bytes([(-(len(body) + 2)) & 0xFF]) + b"\xe6\x81" + b"\xeb\xfe")


def pio_bare(n: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per exit of a bare Python loop around KVM_RUN: a VM set up as
    pystrato sets its own (in-kernel irqchip, CPUID and MSRs), no device dispatch."""
    from adapters.host.memory import MmapAllocator
    from adapters.kvm.hypervisor import KvmHypervisor
    from domain.cpu_state import VcpuSetup
    from tests.contract.longmode import enter

    hv = KvmHypervisor()
    alloc = MmapAllocator()
    mem = alloc.allocate([(0, 2 << 20)])
    vm = hv.create_vm()
    try:
        vm.create_irqchip()
        vm.set_memory_region(0, 0, mem.regions[0].view)
        vcpu = vm.create_vcpu(0)
        vcpu.setup(VcpuSetup(index=0, apic_id=0, nr_vcpus=1, threads_per_core=1, cores_per_socket=1))
        mem.write(0x4000, _out_loop(n))
        enter(vcpu, mem, "long", 0x4000)
        run = vcpu.run
        w0, c0 = time.perf_counter(), time.thread_time()
        while run().port == PORT:
            pass
        w1, c1 = time.perf_counter(), time.thread_time()
    finally:
        vm.close()
        alloc.free(mem)
        hv.close()
    return (w1 - w0) / n, (c1 - c0) / n


def python_loop(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    return (time.perf_counter() - t0) / n


# --- virtio-blk ----------------------------------------------------------------------------------

def make_image(path: Path, size: int) -> None:
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def guest_tsc_khz() -> int:
    """The TSC frequency KVM gives a vCPU here (pystrato does not change it)."""
    from adapters.kvm.hypervisor import KvmHypervisor

    hv = KvmHypervisor()
    vm = hv.create_vm()
    try:
        return vm.create_vcpu(0).tsc_khz()
    finally:
        vm.close()
        hv.close()


def blk_pystrato(workdir: Path, img: Path, op: str, total: int, depth: int, direct: bool,
                 wait: str = "poll", ring: int = 3, tsc_khz: int = 0) -> tuple[float, float]:
    """Bytes per second the guest moved: by the guest's TSC, and between the serial lines."""
    v = GuestVm(workdir, build_guest("virtio_blk"),
                f"bench={op} bs={BS} total={total} depth={depth} wait={wait} ring={ring}",
                "-drive", f"file={img},id=d0,format=raw,direct={'on' if direct else 'off'}",
                "-device", "virtio-blk-device,drive=d0,id=blk0", name="blk")
    try:
        _, t0 = v.wait_line(r"^bench: start", timeout=120)
        m, t1 = v.wait_line(r"^bench: done bytes=(\d+) errors=(\d+) tsc=(\d+)", timeout=900)
        if m.group(2) != "0":
            raise RuntimeError(f"guest saw {m.group(2)} failed requests")
        moved, cycles = int(m.group(1)), int(m.group(3))
        v.wait_exit(60)
    finally:
        v.close()
    return moved / (cycles / (tsc_khz * 1e3)), moved / (t1 - t0)


def blk_host(img: Path, op: str, total: int, direct: bool, depth: int = 1) -> float:
    """Bytes per second of sequential 64 KiB preadv/pwritev from this process, cycling through
    ``depth`` buffers as the guest does (8 x 64 KiB no longer fit the CPU's L2 cache the way one
    does, which shows at page-cache speed)."""
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(img, flags)
    bufs = [mmap.mmap(-1, BS) for _ in range(depth)]  # page aligned, as O_DIRECT wants
    for buf in bufs:
        buf.write(os.urandom(BS))
    views = [[memoryview(buf)] for buf in bufs]
    size = os.fstat(fd).st_size
    try:
        t0 = time.perf_counter()
        off = done = i = 0
        while done < total:
            view = views[i]
            n = os.pwritev(fd, view, off) if op == "write" else os.preadv(fd, view, off)
            if n != BS:
                raise RuntimeError(f"short {op}: {n}")
            done += BS
            off = (off + BS) % size
            i = (i + 1) % depth
        elapsed = time.perf_counter() - t0
    finally:
        for view in views:
            view[0].release()
        for buf in bufs:
            buf.close()
        os.close(fd)
    return total / elapsed


# --- report --------------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--exits", type=int, default=50000)
    ap.add_argument("--mib", type=int, default=64, help="MiB per block run (and the image size)")
    ap.add_argument("--depths", default="1,8", help="requests in flight, comma-separated")
    ap.add_argument("--direct", default="off,on", help="O_DIRECT settings to measure: off,on")
    ap.add_argument("--wait", default="poll", choices=("irq", "poll"),
                    help="how the guest waits for completions (hlt + interrupt, or spinning)")
    ap.add_argument("--ring", type=int, default=3, choices=(0, 3),
                    help="the guest's request loop in ring 0 or (with --wait poll) ring 3")
    args = ap.parse_args(argv)
    if args.ring == 3 and args.wait != "poll":
        ap.error("--ring 3 needs --wait poll (hlt is a ring-0 instruction)")
    if not os.path.exists("/dev/kvm"):
        print("bench/kvm_devices.py: /dev/kvm is missing", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, str, float, str]] = []

    with tempfile.TemporaryDirectory(prefix="pystrato-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        work = Path(d)
        # Each run measures pystrato and its reference back to back, so both see the same host load.
        ours, bare, empty = [], [], []
        for _ in range(args.runs):
            ours.append(pio_pystrato(work, args.exits))
            bare.append(pio_bare(args.exits))
            empty.append(python_loop(args.exits))
        ow, oc = median([x[0] for x in ours]), median([x[1] for x in ours])
        bw, bc = median([x[0] for x in bare]), median([x[1] for x in bare])
        el = median(empty)
        rows.append(("PIO exit round trip (wall)", f"{ow * 1e6:.2f} µs", f"{bw * 1e6:.2f} µs (bare KVM_RUN loop)",
                     ow / bw, "≤ 1.2×"))
        rows.append(("PIO exit round trip (vCPU thread CPU time)", f"{oc * 1e6:.2f} µs",
                     f"{bc * 1e6:.2f} µs (bare KVM_RUN loop)", oc / bc, "≤ 1.2×"))
        rows.append(("PIO exit vs an empty Python loop iteration", f"{ow * 1e6:.2f} µs", f"{el * 1e9:.1f} ns",
                     ow / el, "(scale)"))

        img = work / "bench.img"
        total = args.mib * MIB
        make_image(img, total)
        khz = guest_tsc_khz()
        for direct in [x.strip() == "on" for x in args.direct.split(",") if x.strip()]:
            for op in ("write", "read"):
                for depth in (int(x) for x in args.depths.split(",")):
                    guest, lines, host = [], [], []
                    for _ in range(args.runs):
                        by_tsc, by_lines = blk_pystrato(work, img, op, total, depth, direct, args.wait, args.ring, khz)
                        guest.append(by_tsc)
                        lines.append(by_lines)
                        host.append(blk_host(img, op, total, direct, depth))
                    g, h = median(guest), median(host)
                    rows.append((f"virtio-blk 64 KiB seq {op}, depth {depth}, direct={'on' if direct else 'off'}, "
                                 f"wait={args.wait}, ring {args.ring}",
                                 f"{g / MIB:.1f} MiB/s (lines: {median(lines) / MIB:.0f})",
                                 f"{h / MIB:.1f} MiB/s (host {'pwritev' if op == 'write' else 'preadv'})",
                                 g / h, "≥ 0.8×"))

    load = os.getloadavg()[0]
    print(f"pystrato on KVM, test guests; median of {args.runs} runs; {args.exits} exits; "
          f"{args.mib} MiB per block run; {os.cpu_count()} CPUs, load average {load:.1f} at the end\n")
    print("| measurement | pystrato | reference | ratio | goal |")
    print("|---|---|---|---|---|")
    for name, ours, ref, ratio, goal in rows:
        print(f"| {name} | {ours} | {ref} | {ratio:.2f}× | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
