"""StratoVirt's guest console on the real process: -chardev socket + virtio-serial-device +
virtconsole with `-accel test`. The fake guest has no virtio driver, so this checks the host side
(the socket serves clients while the VM runs, and goes away with it); the data path is covered
by tests/unit/test_dev_virtio_console.py and tests/integration/test_console_wiring.py."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

from tests.e2e.qmpclient import ROOT

TIMEOUT = 10.0


def console(path):
    return ["-chardev", f"socket,id=con,path={path},server,nowait",
            "-device", "virtio-serial-device", "-device", "virtconsole,id=console0,chardev=con"]


def wait_for(predicate, what):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_console_socket_serves_a_client_while_the_vm_runs(vmm, tmp_path):
    path = str(tmp_path / "console.sock")
    log = tmp_path / "vmm.log"
    p = vmm(*console(path), "-D", str(log))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(TIMEOUT)
    client.connect(path)
    client.sendall(b"typed before the guest has a driver\n")
    wait_for(lambda: b"chardev con: client connected" in log.read_bytes(), "the chardev to accept")

    qmp = p.client()
    assert qmp.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
    assert qmp.cmd("stop")[-1] == {"return": {}}
    assert qmp.cmd("cont")[-1] == {"return": {}}
    qmp.cmd("quit")
    assert p.wait() == 0
    assert client.recv(64) == b""  # an accepted connection, closed by the VMM at exit
    assert not os.path.exists(path)


def test_a_second_client_is_served_after_the_first(vmm, tmp_path):
    path = str(tmp_path / "console.sock")
    log = tmp_path / "vmm.log"
    p = vmm(*console(path), "-D", str(log))
    first = socket.socket(socket.AF_UNIX)
    first.connect(path)
    wait_for(lambda: log.read_bytes().count(b"client connected") == 1, "the first client")
    second = socket.socket(socket.AF_UNIX)
    second.connect(path)
    first.close()
    wait_for(lambda: log.read_bytes().count(b"client connected") == 2, "the second client")
    p.client().cmd("quit")
    assert p.wait() == 0


def run_refused(*args, qmp):
    proc = subprocess.run([sys.executable, "-m", "application.cli", "-accel", "test", *args,
                           "-qmp", f"unix:{qmp},server,nowait"], cwd=ROOT, capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)
    lines = proc.stderr.decode().splitlines()
    return proc.returncode, lines


def test_unusable_console_chardevs_are_refused_before_qmp_starts(tmp_path):
    qmp = str(tmp_path / "qmp.sock")
    missing_dir = str(tmp_path / "nowhere" / "c.sock")
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    cases = [
        (console(missing_dir), "-chardev", "does not exist"),
        (console(str(plain)), "-chardev: chardev 'con': socket", "exists and is not a socket"),
        (["-chardev", f"socket,id=con,path={tmp_path}/c.sock", "-device", "virtio-serial-device",
          "-device", "virtconsole,id=c0,chardev=con"], "-chardev", "'server' is required"),
        (["-chardev", "pty,id=con", "-device", "virtio-serial-device",
          "-device", "virtconsole,id=c0,chardev=con"], "-chardev", "pty chardev 'con' is not supported"),
    ]
    for args, option, reason in cases:
        code, lines = run_refused(*args, qmp=qmp)
        assert code == 1, (args, lines)
        assert len(lines) == 1 and option in lines[0] and reason in lines[0], lines
        assert not os.path.exists(qmp)
