#!/usr/bin/env python3
"""Linux boot milestones on pystrato and on QEMU, same host, same run, interleaved.

Both VMMs boot the same kernel (the ELF vmlinux, or --kernel bzImage), initramfs and command line from scripts/build-guest on KVM
(microvm, 1 vCPU, 256 MiB) with a fresh copy of rootfs.ext4 on virtio-blk; the guest's /init
mounts it, writes a random token, syncs and resets through the i8042, which ends both VMMs
(pystrato: SHUTDOWN guest-reset and exit 0; QEMU: -no-reboot). The serial console goes to a
file that is polled every few milliseconds: a milestone's time is when its line first shows up
there, counted from the VMM's exec. Each run checks the token in its image with debugfs.

The initramfs is the uncompressed initramfs.cpio by default: the same files as
initramfs.cpio.gz, but unpacking the gzip'ed one costs the guest 80-100 s under kvm-pvm here
(--initrd initramfs.cpio.gz to measure that too). QEMU's microvm gets the devices pystrato's
has: no ACPI (so QEMU appends the virtio_mmio.device= lines itself), an i8042 for reboot=k and
the CMOS RTC (microvm leaves it out under KVM by default; without it Linux polls the empty
ports for a second of guest time).

Runs take minutes each under kvm-pvm, so the default is one run of each (--runs N for more;
the table then gives medians). Prints a Markdown table with pystrato/QEMU ratios.

    .venv/bin/python bench/kvm_vs_qemu.py [--runs N] [--guest DIR] [--kernel vmlinux|bzImage]
                                          [--initrd NAME] [--timeout S] [--keep-logs DIR]
                                          [--extra-append PARAMS]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLL = 0.005

MILESTONES = [
    ("kernel banner", r"Linux version \d"),
    ("virtio-blk found", r"virtio_blk virtio\d+: \[vd[a-z]+\]"),
    ("init started", r"pystrato: kernel reached init"),
    ("init ok", r"PYSTRATO-INIT-OK"),
    ("script done", r"PYSTRATO-SCRIPT-DONE"),
]
FAILURES = re.compile(r"PYSTRATO-SCRIPT-FAILED.*|Kernel panic.*")
EXIT = "exit"


def guest_dir(arg: str | None) -> Path:
    given = arg or os.environ.get("PYSTRATO_GUEST_DIR")
    if given:
        return Path(given)
    out = subprocess.run([str(ROOT / "scripts" / "build-guest")], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


INITRD = "initramfs.cpio"


EXTRA_APPEND = ""  # --extra-append: more kernel parameters for both VMMs (e.g. printk.time=1)


def append_line(guest: Path, token: str) -> str:
    return ((guest / "cmdline").read_text().strip() + (f" {EXTRA_APPEND}" if EXTRA_APPEND else "")
            + f" pystrato.script=mountwrite pystrato.token={token} pystrato.end=reboot")


def pystrato_args(guest: Path, initrd: str, image: Path, serial: Path, work: Path, token: str,
                  kernel: str = "vmlinux") -> list[str]:
    exe = ROOT / ".venv/bin/python"
    return [str(exe) if exe.exists() else sys.executable, "-m", "application.cli",
            "-accel", "kvm", "-machine", "microvm", "-smp", "1", "-m", "256",
            "-kernel", str(guest / kernel), "-initrd", str(guest / initrd),
            "-append", append_line(guest, token),
            "-drive", f"file={image},id=rootfs,readonly=off,direct=off",
            "-device", "virtio-blk-device,drive=rootfs",
            "-serial", f"file:{serial}", "-qmp", f"unix:{work / 'qmp.sock'},server,nowait"]


def qemu_args(guest: Path, initrd: str, image: Path, serial: Path, work: Path, token: str,
              kernel: str = "vmlinux") -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        sys.exit("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    # The devices pystrato's microvm has (see the module docstring): acpi=off makes QEMU add
    # the virtio_mmio.device= lines itself; reboot=k needs the i8042 (without it Linux ends up
    # in a triple fault through int3, which kvm-pvm does not survive).
    return [qemu, "-M", "microvm,acpi=off,rtc=on", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", "256", "-smp", "1",
            "-kernel", str(guest / kernel), "-initrd", str(guest / initrd),
            "-append", append_line(guest, token),
            "-drive", f"id=d,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d",
            "-device", "i8042", "-nodefaults", "-no-user-config", "-nographic",
            "-serial", f"file:{serial}", "-no-reboot"]


def boot(vmm: str, guest: Path, initrd: str, timeout: float, kernel: str = "vmlinux",
         keep: Path | None = None) -> dict[str, float]:
    """One boot; returns seconds from exec to each milestone and to the VMM's exit. ``keep``:
    where to copy the guest's serial log (named by VMM and time)."""
    with tempfile.TemporaryDirectory(prefix=f"kvq-{vmm}-") as tmp:
        work = Path(tmp)
        image = work / "rootfs.ext4"
        shutil.copyfile(guest / "rootfs.ext4", image)
        serial = work / "serial.log"
        token = secrets.token_hex(8)
        build = pystrato_args if vmm == "pystrato" else qemu_args
        args = build(guest, initrd, image, serial, work, token, kernel)
        times: dict[str, float] = {}
        text = ""
        with open(work / "stderr", "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            try:
                with_pos = 0
                while True:
                    rc = proc.poll()
                    now = time.perf_counter() - start
                    if serial.exists():
                        text = serial.read_text(errors="replace")
                    for name, rx in MILESTONES[with_pos:]:
                        if not re.search(rx, text):
                            break
                        times[name] = now
                        with_pos += 1
                    if rc is not None:
                        times[EXIT] = now
                        break
                    if FAILURES.search(text):
                        raise RuntimeError(f"{vmm}: guest failed: {FAILURES.search(text).group(0)}")
                    if now > timeout:
                        raise RuntimeError(f"{vmm}: no exit within {timeout:.0f} s; reached {list(times)}")
                    time.sleep(POLL)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        if keep is not None and serial.exists():
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(serial, keep / f"{vmm}-{time.strftime('%H%M%S')}.log")
        if proc.returncode != 0:
            raise RuntimeError(f"{vmm}: exit code {proc.returncode}: "
                               f"{(work / 'stderr').read_text(errors='replace')[-1500:]}")
        missing = [n for n, _ in MILESTONES if n not in times]
        if missing:
            raise RuntimeError(f"{vmm}: milestones missing: {missing}\n{text[-2000:]}")
        cat = subprocess.run(["debugfs", "-R", "cat /token", str(image)], check=False, capture_output=True, text=True)
        if cat.stdout != token + "\n":
            raise RuntimeError(f"{vmm}: token not in the image ({cat.stdout!r})")
        return times


def table(results: dict[str, list[dict[str, float]]], runs: int) -> str:
    label = "median s" if runs > 1 else "s"
    rows = [f"| milestone (from exec) | pystrato {label} | QEMU {label} | pystrato/QEMU |",
            "|---|---:|---:|---:|"]
    for name in [n for n, _ in MILESTONES] + [EXIT]:
        p = statistics.median(r[name] for r in results["pystrato"])
        q = statistics.median(r[name] for r in results["qemu"])
        rows.append(f"| {name} | {p:.1f} | {q:.1f} | {p / q:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="boots of each VMM (default 1: minutes each)")
    ap.add_argument("--guest", help="guest directory (default $PYSTRATO_GUEST_DIR or scripts/build-guest)")
    ap.add_argument("--kernel", default="vmlinux", choices=("vmlinux", "bzImage"),
                    help="kernel file in the guest directory (default vmlinux)")
    ap.add_argument("--initrd", default=INITRD, help=f"initramfs file in the guest directory (default {INITRD})")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per boot (default 1800)")
    ap.add_argument("--keep-logs", type=Path, help="copy each boot's serial log into this directory")
    ap.add_argument("--extra-append", default="", help="kernel parameters added for both VMMs")
    a = ap.parse_args()
    global EXTRA_APPEND
    EXTRA_APPEND = a.extra_append
    guest = guest_dir(a.guest)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("/dev/kvm is not usable: this benchmark compares the two VMMs on KVM")
    print(f"guest: {guest} (kernel {a.kernel}, initrd {a.initrd})", flush=True)
    for vmm, build in (("pystrato", pystrato_args), ("qemu", qemu_args)):
        cmd = build(guest, a.initrd, Path("COPY.ext4"), Path("SERIAL.log"), Path("WORK"), "TOKEN", a.kernel)
        print(f"{vmm}: " + " ".join(f"'{x}'" if " " in x else x for x in cmd), flush=True)
    print(f"runs: {a.runs} of each VMM, interleaved (pystrato first on even runs)"
          f"{'' if a.runs > 1 else '; default 1 run each, as boots take minutes: use --runs N for medians'}",
          flush=True)
    results: dict[str, list[dict[str, float]]] = {"pystrato": [], "qemu": []}
    for i in range(a.runs):
        order = ("pystrato", "qemu") if i % 2 == 0 else ("qemu", "pystrato")
        for vmm in order:
            t = boot(vmm, guest, a.initrd, a.timeout, a.kernel, a.keep_logs)
            results[vmm].append(t)
            print(f"run {i + 1} {vmm}: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()), flush=True)
    print()
    print(f"Linux boot on KVM here ({os.uname().release}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}),"
          f" {a.runs} run(s) each:\n")
    print(table(results, a.runs))


if __name__ == "__main__":
    main()
