"""Linux end to end on KVM: the kernel built by scripts/build-guest boots on pystrato's microvm
(as an ELF vmlinux and as a bzImage; initramfs, one virtio-blk disk), its /init mounts the ext4 disk, writes the token
from the command line, syncs, unmounts and reboots through the i8042; pystrato ends with
SHUTDOWN {"guest": true, "reason": "guest-reset"} and exit code 0, and the host finds the token
in the image, which e2fsck finds clean.

The initramfs is the uncompressed initramfs.cpio (the same files as initramfs.cpio.gz): under
kvm-pvm the guest needs 80-100 s more to gunzip the other one, for nothing this test checks.
Slow: minutes under kvm-pvm (shadow paging, 2 shared cores in CI), so the timeouts are generous.
The milestone times are printed (run with -s to see them); nothing asserts a duration.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.qmpclient import RawQmp

ROOT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 15 * 60.0

pytestmark = [pytest.mark.kvm, pytest.mark.slow, pytest.mark.timeout(int(BOOT_TIMEOUT) + 300)]

# In the order the guest prints them.
MILESTONES = [
    ("kernel banner", r"Linux version \d"),
    ("virtio-blk found", r"virtio_blk virtio\d+: \[vd[a-z]+\]"),
    ("kernel reached init", r"pystrato: kernel reached init"),
    ("init ok", r"PYSTRATO-INIT-OK"),
    ("script done", r"PYSTRATO-SCRIPT-DONE"),
]
FAILURES = r"PYSTRATO-SCRIPT-FAILED.*|Kernel panic.*"


def _connect(sock: Path, proc: subprocess.Popen) -> RawQmp:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"pystrato exited {proc.returncode} before serving QMP")
        try:
            return RawQmp(str(sock), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Both kernel formats of the boot protocol: the ELF vmlinux (entered at its 64-bit e_entry) and
# the bzImage (LZ4, entered at its decompressor's 64-bit entry, load address + 0x200).
@pytest.mark.parametrize("kernel", ["vmlinux", "bzImage"])
def test_linux_mounts_the_disk_writes_the_token_and_resets(tmp_path, linux_guest, kernel):
    image = tmp_path / "rootfs.ext4"
    shutil.copyfile(linux_guest / "rootfs.ext4", image)
    token = secrets.token_hex(8)
    serial_path = tmp_path / "serial.log"
    sock = tmp_path / "qmp.sock"
    append = ((linux_guest / "cmdline").read_text().strip()
              + f" pystrato.script=mountwrite pystrato.token={token} pystrato.end=reboot")
    args = [sys.executable, "-m", "application.cli", "-accel", "kvm", "-machine", "microvm",
            "-smp", "1", "-m", "256", "-kernel", str(linux_guest / kernel),
            "-initrd", str(linux_guest / "initramfs.cpio"), "-append", append,
            "-drive", f"file={image},id=rootfs,readonly=off,direct=off",
            "-device", "virtio-blk-device,drive=rootfs",
            "-serial", f"file:{serial_path}", "-qmp", f"unix:{sock},server,nowait"]
    stderr_path = tmp_path / "stderr"
    start = time.monotonic()
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    seen: dict[str, float] = {}
    event = None
    try:
        qmp = _connect(sock, proc)
        assert qmp.cmd("qmp_capabilities")[-1] == {"return": {}}
        qmp.sock.settimeout(0.5)
        deadline = start + BOOT_TIMEOUT
        while event is None:
            text = serial_path.read_text(errors="replace") if serial_path.exists() else ""
            now = time.monotonic() - start
            for name, rx in MILESTONES:
                if name not in seen and re.search(rx, text):
                    seen[name] = now
            bad = re.search(FAILURES, text)
            assert bad is None, f"guest failed: {bad.group(0)}\n--- serial tail ---\n{text[-3000:]}"
            try:
                msg = qmp.recv()
            except TimeoutError:
                msg = {}
            except ConnectionError:
                raise AssertionError(f"QMP closed before SHUTDOWN (exit {proc.poll()})\n"
                                     f"--- stderr ---\n{stderr_path.read_text()[-2000:]}\n"
                                     f"--- serial tail ---\n{text[-3000:]}") from None
            if msg.get("event") == "SHUTDOWN":
                event = msg
            assert time.monotonic() < deadline, (f"no SHUTDOWN within {BOOT_TIMEOUT:.0f} s; milestones {seen}"
                                                 f"\n--- serial tail ---\n{text[-3000:]}")
        assert event["data"] == {"guest": True, "reason": "guest-reset"}
        assert proc.wait(60) == 0, stderr_path.read_text()[-2000:]
        total = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    text = serial_path.read_text(errors="replace")
    positions = []
    for name, rx in MILESTONES:
        m = re.search(rx, text)
        assert m, f"milestone '{name}' ({rx}) missing from the serial log\n{text[-3000:]}"
        positions.append(m.start())
    assert positions == sorted(positions), f"milestones out of order: {positions}"

    print("\nLinux on pystrato (microvm, KVM), seconds from exec:")
    for name, _ in MILESTONES:
        print(f"  {name:<22} {seen.get(name, float('nan')):8.1f}")
    print(f"  {'exit (guest reset)':<22} {total:8.1f}")

    # The host sees what the guest wrote, and the filesystem is consistent after the reset.
    cat = subprocess.run(["debugfs", "-R", "cat /token", str(image)], check=False, capture_output=True, text=True)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == token + "\n", (cat.stdout, cat.stderr)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
