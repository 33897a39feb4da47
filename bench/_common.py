"""Shared pieces of the pystrato-vs-QEMU snapshot and migration benchmarks: a small blocking
QMP client, process start/stop, the "fully written" memory images, and the Markdown table."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096
MIB = 1 << 20


def pystrato_cmd() -> list[str]:
    """The program users run (the console script, which enters through application.launch),
    or the module where setup has not installed it."""
    script = ROOT / ".venv/bin/pystrato"
    if script.exists():
        return [str(script)]
    exe = ROOT / ".venv/bin/python"
    return [str(exe) if exe.exists() else sys.executable, "-m", "application.cli"]


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        sys.exit("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return qemu


def qemu_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


class QmpError(RuntimeError):
    pass


class Qmp:
    """Blocking QMP client. Connects as soon as the socket accepts (retrying every poll
    seconds), reads the greeting and negotiates; events are skipped."""

    def __init__(self, path: str, proc: subprocess.Popen | None = None, timeout: float = 60.0,
                 poll: float = 0.001):
        deadline = time.perf_counter() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise QmpError(f"process exited {proc.returncode} before serving QMP")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"no QMP on {path}") from None
                time.sleep(poll)
        s.settimeout(timeout)
        self.sock = s
        self.f = s.makefile("rb")
        self._line()  # greeting
        self.cmd("qmp_capabilities")

    def _line(self) -> dict:
        line = self.f.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name: str, args: dict | None = None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc')}")

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def pystrato_env(pycache: str) -> dict:
    """pystrato's environment: bytecode cached (in ``pycache``, outside the repository), as an
    installed package has it (pip compiles .pyc at install). With PYTHONDONTWRITEBYTECODE=1,
    as some sandboxes set, every start would compile ~150 modules again (~0.3 s here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def start(cmd: list[str], log: str | None = None, env: dict | None = None) -> subprocess.Popen:
    err = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    finally:
        if log:
            err.close()


def finish(proc: subprocess.Popen, qmp: Qmp | None = None, timeout: float = 30.0) -> None:
    """quit over QMP when possible, else kill; always reap."""
    if proc.poll() is None and qmp is not None:
        try:
            qmp.cmd("quit")
        except (OSError, EOFError, QmpError):
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if qmp is not None:
        qmp.close()


def unlink(*paths: str) -> None:
    for p in paths:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except FileNotFoundError:
            pass


def wait_migrate(qmp: Qmp, poll: float = 0.001, timeout: float = 600.0) -> dict:
    """Poll query-migrate until completed (QmpError on failed/cancelled)."""
    deadline = time.perf_counter() + timeout
    while True:
        info = qmp.cmd("query-migrate")
        if info["status"] == "completed":
            return info
        if info["status"] in ("failed", "cancelled"):
            raise QmpError(f"migration {info['status']}: {info.get('error-desc', '')}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"migration still {info['status']}")
        time.sleep(poll)


def wait_run_state(qmp: Qmp, want: set[str], poll: float = 0.001, timeout: float = 600.0) -> str:
    deadline = time.perf_counter() + timeout
    while True:
        st = qmp.cmd("query-status")["status"]
        if st in want:
            return st
        if time.perf_counter() > deadline:
            raise TimeoutError(f"run state still {st}")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# "Fully written" guest memory
# ---------------------------------------------------------------------------------------------


def write_pattern(path: str, size: int, seed: int = 1) -> None:
    """``size`` bytes in which every 4 KiB page is non-zero (random 16 MiB, repeated: neither
    side compresses, only zero pages are special)."""
    import random

    block = random.Random(seed).randbytes(16 * MIB)
    with open(path, "wb") as f:
        for off in range(0, size, len(block)):
            f.write(block[: min(len(block), size - off)])


def fill_snapshot(src_dir: str, dst_dir: str, seed: int = 1) -> None:
    """A pystrato snapshot whose guest RAM is fully written: the state of ``src_dir``, and a
    memory file with every page non-zero except that the pages the original guest had written
    (its idle loop) are kept, so the restored guest still runs the same code."""
    os.makedirs(dst_dir, exist_ok=True)
    shutil.copyfile(os.path.join(src_dir, "state"), os.path.join(dst_dir, "state"))
    src_mem = os.path.join(src_dir, "memory")
    dst_mem = os.path.join(dst_dir, "memory")
    size = os.path.getsize(src_mem)
    write_pattern(dst_mem, size, seed)
    zero = bytes(PAGE)
    with open(src_mem, "rb") as src, open(dst_mem, "r+b") as dst:
        # SEEK_DATA walks only the allocated extents of the sparse original.
        fd = src.fileno()
        off = 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, off, os.SEEK_HOLE)
            for page in range(off, end, PAGE):
                data = os.pread(fd, PAGE, page)
                if data != zero:
                    dst.seek(page)
                    dst.write(data)
            off = end



class BenchBase:
    """What the snapshot and migration benchmarks share: the QEMU binary and accelerator, the
    environment pystrato runs in, and per guest size the prefilled RAM image QEMU maps."""

    def __init__(self, workdir: str, accel: str):
        self.dir = workdir
        self.accel = accel
        self.qemu = qemu_binary()
        self.qaccel = qemu_accel()
        self.env = pystrato_env(os.path.join(workdir, "pycache"))
        self.prefill: dict[int, str] = {}
        self.guest: list[str] = []  # pystrato's guest: none for the fake's built-in idle guest
        if accel == "kvm":  # an idle guest, as QEMU's firmware with nothing to boot is
            sys.path.insert(0, str(ROOT))
            from tests.guests.build import build_guest

            self.guest = ["-kernel", str(build_guest("hello")), "-append", "exit=halt"]

    def ours_cmd(self, size: int, name: str, *extra: str) -> tuple[list[str], str]:
        """pystrato's command line for a microvm guest of ``size`` MiB with QMP on DIR/NAME.sock,
        and that socket."""
        sock = os.path.join(self.dir, f"{name}.sock")
        unlink(sock)
        return [*pystrato_cmd(), "-accel", self.accel, "-machine", "microvm", "-m", str(size),
                *self.guest, *extra, "-qmp", f"unix:{sock},server,nowait"], sock

    def qemu_cmd(self, size: int, name: str, backend: str, *extra: str) -> tuple[list[str], str]:
        """QEMU's command line for a microvm guest of ``size`` MiB whose RAM is the -object
        ``backend`` (see qemu_memory), QMP on DIR/NAME.sock, and that socket."""
        sock = os.path.join(self.dir, f"{name}.sock")
        unlink(sock)
        return [self.qemu, "-M", "microvm,memory-backend=mem", "-object", backend,
                "-accel", self.qaccel, "-m", str(size), "-nodefaults", "-display", "none",
                *extra, "-qmp", f"unix:{sock},server=on,wait=off"], sock

    def qemu_memory(self, size: int, content: str = "zero") -> str:
        """QEMU's RAM backend: for "full", the prefilled image mapped MAP_PRIVATE; else anonymous."""
        if content == "full":
            return f"memory-backend-file,id=mem,size={size}M,mem-path={self.prefill[size]},share=off"
        return f"memory-backend-ram,id=mem,size={size}M"

    def make_templates(self, size: int, cmd: list[str], sock: str) -> tuple[str, str]:
        """Snapshot the fresh pystrato guest ``cmd`` starts (QMP on ``sock``) into
        DIR/tpl-SIZE-zero, derive DIR/tpl-SIZE-full (every page written) from it, and write
        QEMU's image DIR/qemu-SIZE.ram (``prefill[size]``). Returns (zero, full)."""
        zero = os.path.join(self.dir, f"tpl-{size}-zero")
        full = os.path.join(self.dir, f"tpl-{size}-full")
        os.makedirs(zero, exist_ok=True)
        p = start(cmd, env=self.env)
        q = Qmp(sock, p)
        q.cmd("stop")
        q.cmd("migrate", {"uri": f"file:{zero}"})
        wait_migrate(q)  # the snapshot is written in the background; quit would cancel it
        finish(p, q)
        fill_snapshot(zero, full)
        self.prefill[size] = os.path.join(self.dir, f"qemu-{size}.ram")
        write_pattern(self.prefill[size], size * MIB)
        return zero, full


# ---------------------------------------------------------------------------------------------
# Command line and reporting
# ---------------------------------------------------------------------------------------------

CONTENTS = ("zero", "full")  # a fresh guest's mostly zero RAM; every page written


def parse_args(doc: str, dir_help: str) -> argparse.Namespace:
    """The benchmarks' options: --runs, --sizes (a list of MiB), --dir and --accel."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default=[256, 1024], type=lambda v: [int(s) for s in v.split(",")],
                    help="guest sizes in MiB")
    ap.add_argument("--dir", default=None, help=dir_help)
    ap.add_argument("--accel", default="test",
                    help="pystrato's -accel: test, or kvm (then the `hello` test guest, halted after its line)")
    return ap.parse_args()


def case_label(size: int, content: str) -> str:
    sizes = {256: "256 MiB", 1024: "1 GiB"}
    return f"{sizes.get(size, f'{size} MiB')} {'mostly zero' if content == 'zero' else 'fully written'}"



def min_median(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def fmt_s(v: float) -> str:
    return f"{v * 1000:.0f} ms" if v >= 0.1 else f"{v * 1000:.1f} ms"


def ratio(a: float, b: float) -> str:
    if b == 0:
        return "n/a" if a == 0 else "inf"
    return f"{a / b:.2f}"


def print_table(title: str, rows: list[tuple[str, list[float], list[float]]], runs: int) -> None:
    """rows: (label, pystrato samples in s, QEMU samples in s)."""
    print(f"\n### {title} ({runs} runs)\n")
    print("| case | pystrato min | pystrato median | QEMU min | QEMU median | ratio min | ratio median |")
    print("|---|---|---|---|---|---|---|")
    for label, ours, theirs in rows:
        omin, omed = min_median(ours)
        tmin, tmed = min_median(theirs)
        print(f"| {label} | {fmt_s(omin)} | {fmt_s(omed)} | {fmt_s(tmin)} | {fmt_s(tmed)} "
              f"| {ratio(omin, tmin)} | {ratio(omed, tmed)} |")
    sys.stdout.flush()
