#!/usr/bin/env python3
"""pystrato vs QEMU on the same host, same socket options: exec -> QMP greeting, query-status
round trip (p50/p99 over N calls), and process PSS. Prints a Markdown table of ratios.

    .venv/bin/python bench/qmp_vs_qemu.py [--runs 5] [--calls 2000] [--accel test|kvm]

QEMU runs `-M microvm -S -accel kvm` (paused, no guest: what pystrato is measured against is the
management plane, not a guest). pystrato runs the same machine with -accel test by default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def connect_greeting(path: str, proc: subprocess.Popen, t0: float, timeout=30.0):
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        except OSError:
            s.close()
            time.sleep(0.0005)
            continue
        f = s.makefile("rb")
        f.readline()
        return time.perf_counter() - t0, s, f
    raise TimeoutError("no greeting")


def roundtrips(s: socket.socket, f, calls: int) -> list[float]:
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    f.readline()
    msg = b'{"execute":"query-status"}\n'
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        s.sendall(msg)
        line = f.readline()
        out.append(time.perf_counter() - t)
        assert b"return" in line, line
    return out


@contextlib.contextmanager
def spawned(cmd: list[str]):
    """(process, its exec time) for the block; killed at the end if it is still running."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield proc, t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_one(cmd: list[str], sock: str, calls: int) -> dict:
    if os.path.exists(sock):
        os.unlink(sock)
    with spawned(cmd) as (proc, t0):
        greet, s, f = connect_greeting(sock, proc, t0)
        rts = roundtrips(s, f, calls)
        pss = pss_kib(proc.pid)
        s.sendall(b'{"execute":"quit"}\n')
        s.close()
        proc.wait(10)
    rts.sort()
    return {"greeting_s": greet, "p50_us": rts[len(rts) // 2] * 1e6,
            "p99_us": rts[int(len(rts) * 0.99)] * 1e6, "pss_kib": pss}


# The least any Python VMM built on this design pays before its greeting: the interpreter, the
# composition root's dependency-injector (which imports asyncio, inspect, json...), one unix
# socket. Measured the same way, it shows how much of pystrato's start-up is pystrato's own.
FLOOR = """
import sys, socket, dependency_injector.containers, dependency_injector.providers
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()
c, _ = s.accept(); c.sendall(b'{"QMP": {}}\\n'); f = c.makefile("rb")
while (line := f.readline()):
    c.sendall(b'{"return": {}}\\n')
"""


def floor_greeting(python: str, sock: str) -> float:
    if os.path.exists(sock):
        os.unlink(sock)
    with spawned([python, "-c", FLOOR, sock]) as (proc, t0):
        greet, s, f = connect_greeting(sock, proc, t0)
        f.close()
        s.close()
        proc.wait(10)
    return greet


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--accel", default="test")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        sys.exit("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    tmp = tempfile.mkdtemp(prefix="pystrato-bench-")
    py = str(ROOT / ".venv/bin/pystrato") if (ROOT / ".venv/bin/pystrato").exists() else None
    ours_cmd = ([py] if py else [sys.executable, "-m", "application.cli"]) + [
        "-accel", a.accel, "-machine", "microvm", "-m", "256",
        "-qmp", f"unix:{tmp}/p.sock,server,nowait"]
    qemu_accel = "kvm" if os.path.exists("/dev/kvm") else "tcg"
    qemu_cmd = [qemu, "-M", "microvm", "-S", "-accel", qemu_accel, "-m", "256", "-nodefaults",
                "-display", "none", "-qmp", f"unix:{tmp}/q.sock,server=on,wait=off"]
    results = {"pystrato": [], "qemu": []}
    floor = []
    python = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
    for _ in range(a.runs):  # interleaved, so drift hits all alike
        results["pystrato"].append(run_one(ours_cmd, f"{tmp}/p.sock", a.calls))
        results["qemu"].append(run_one(qemu_cmd, f"{tmp}/q.sock", a.calls))
        floor.append(floor_greeting(python, f"{tmp}/f.sock"))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    med["floor"] = {"greeting_s": statistics.median(floor)}
    if a.json:
        print(json.dumps(med, indent=2))
        return 0
    print(f"runs={a.runs} calls={a.calls} pystrato -accel {a.accel} vs QEMU -M microvm -S -accel {qemu_accel}")
    print("| metric | pystrato (median) | QEMU (median) | ratio |")
    print("|---|---|---|---|")
    for m, unit, scale in (("greeting_s", "ms", 1e3), ("p50_us", "µs", 1), ("p99_us", "µs", 1), ("pss_kib", "MiB", 1 / 1024)):
        ours, theirs = med["pystrato"][m], med["qemu"][m]
        print(f"| {m.split('_')[0]} | {ours * scale:.2f} {unit} | {theirs * scale:.2f} {unit} | {ours / theirs:.2f} |")
    f = med["floor"]["greeting_s"]
    print(f"\nfloor (python + dependency-injector + a socket, no VMM): greeting {f * 1e3:.2f} ms, "
          f"{f / med['qemu']['greeting_s']:.2f}x QEMU; pystrato's own share: "
          f"{(med['pystrato']['greeting_s'] - f) * 1e3:.2f} ms")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
