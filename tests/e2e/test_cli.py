"""The `pystrato` command line and process, run for real (`python -m application.cli`, and the
console script once).

Refusals: every invalid value is refused before anything starts (exit 1, exactly one line on
stderr naming the option and the reason, no QMP socket). Process behaviour: -h/-version,
-daemonize (readiness, argv, stdio, failures), -pidfile, -D, -serial file:, -name/-uuid,
several -qmp sockets, SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domain.cmdline import OPTIONS
from domain.version import VERSION
from tests.e2e.qmpclient import ROOT, RawQmp

PYSTRATO = [sys.executable, "-m", "application.cli"]
TIMEOUT = 60


def run(*args, timeout=TIMEOUT):
    proc = subprocess.run([*PYSTRATO, *args], cwd=ROOT, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def wait_for(predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def process_ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaped (a daemon's parent is init, which may be slow to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def elf_kernel(path, code: bytes) -> str:
    """A minimal ELF64 "kernel" whose code runs at 1 MiB in 64-bit mode (the test hypervisor's
    interpreter runs it), ending in `hlt; jmp .-1`."""
    code += b"\xF4\xEB\xFD"
    entry = 0x100000
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7), 2, 62, 1,
                       entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, entry, entry, len(code), len(code), 0x1000)
    with open(path, "wb") as f:
        f.write((ehdr + phdr).ljust(0x1000, b"\0") + code)
    return str(path)


def serial_writer(text: bytes) -> bytes:
    """mov dx, 0x3f8; then mov al, c; out dx, al for every byte."""
    return b"\x66\xBA\xF8\x03" + b"".join(b"\xB0" + bytes([c]) + b"\xEE" for c in text)


@pytest.fixture
def daemons():
    """pids of daemons a test started: killed at teardown if still alive."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not process_ended(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def files(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    return {"img": str(img), "dir": tmp_path, "qmp": str(tmp_path / "qmp.sock")}


# --- refusals ------------------------------------------------------------------------------------

def _refusals(f):
    img, d = f["img"], f["dir"]
    blk = ["-device", "virtio-blk-device,drive=d0,id=d0"]
    return [
        (["-foo"], "-foo", "unknown option"),
        (["--m", "256"], "--m", "unknown option"),
        (["stray"], "-qmp", "unexpected argument 'stray' after -qmp"),
        (["-m", "256", "-m", "512"], "-m", "given more than once"),
        (["-m"], "-m", "needs a value"),
        (["-m", "12X"], "-m", "is not a size"),
        (["-m", "1.5G"], "-m", "is not a size"),
        (["-m", "64"], "-m", "outside [128 MiB, 512 GiB]"),
        (["-m", "513G"], "-m", "outside [128 MiB, 512 GiB]"),
        (["-m", "0"], "-m", "outside [128 MiB, 512 GiB]"),
        (["-smp", "0"], "-smp", "out of range [1, 254]"),
        (["-smp", "255"], "-smp", "out of range [1, 254]"),
        (["-smp", "2,maxcpus=255"], "-smp", "maxcpus"),
        (["-smp", "4,maxcpus=8,sockets=3"], "-smp", "must equal maxcpus (8)"),
        (["-smp", "4,maxcpus=4,sockets=2,cores=3,threads=1"], "-smp", "= 6 must equal maxcpus (4)"),
        (["-smp", "four"], "-smp", "four"),
        (["-machine", "pc"], "-machine", "is not a machine type"),
        (["-drive", f"file={img},id=d0", "-drive", f"file={img},id=d0", *blk], "-drive", "used twice"),
        (["-drive", f"file={img},id=d0", "-drive", f"file={img},id=d1",
          "-device", "virtio-blk-device,drive=d0,id=x", "-device", "virtio-blk-device,drive=d1,id=x"],
         "-device", "used twice"),
        (["-netdev", "tap,id=n0,ifname=t0", "-netdev", "tap,id=n0,ifname=t1"], "-netdev", "used twice"),
        (["-chardev", "stdio,id=c", "-chardev", f"file,id=c,path={d}/c.log"], "-chardev", "used twice"),
        (["-drive", f"file={img},id=d0"], "-drive", "not used by any device"),
        (["-drive", f"file={d}/missing.img,id=d0", *blk], "-drive", "No such file or directory"),
        (["-drive", f"file={d},id=d0", *blk], "-drive", "Is a directory"),
        (["-kernel", f"{d}/missing-vmlinux"], "-kernel", "No such file or directory"),
        (["-initrd", f"{d}/missing-initrd"], "-initrd", "No such file or directory"),
        (["-mem-path", f"{d}/missing/ram"], "-mem-path", "does not exist"),
        (["-incoming", "bogus"], "-incoming", "is not file:DIR, tcp:HOST:PORT or unix:PATH"),
        (["-incoming", "fd:3"], "-incoming", "not supported by pystrato yet"),
        (["-incoming", f"file:{d}/missing"], "-incoming", "is not a directory"),
        (["-incoming", f"unix:{d}/missing/m.sock"], "-incoming", "does not exist"),
        (["-incoming", "tcp:192.0.2.1:4444"], "-incoming", "cannot listen on tcp:192.0.2.1:4444"),
        (["-incoming", "tcp:127.0.0.1:99999"], "-incoming", "out of range"),
        (["-qmp", f"unix:{d}/missing/q.sock,server,nowait"], "-qmp", "does not exist"),
        (["-qmp", f"unix:{d}/q2.sock"], "-qmp", "'server' is required"),
        (["-D", f"{d}/missing/vmm.log"], "-D", "does not exist"),
        (["-pidfile", f"{d}/missing/vmm.pid"], "-pidfile", "does not exist"),
        (["-pidfile", str(d)], "-pidfile", "Is a directory"),
        (["-serial", f"file:{d}/missing/serial.log"], "-serial", "does not exist"),
        (["-serial", "vc"], "-serial", "is not a chardev backend"),
        (["-uuid", "not-a-uuid"], "-uuid", "is not a UUID"),
        (["-accel", "tcg"], "-accel", "is not an accelerator"),
        (["-device", "virtio-blk-pci,drive=d0,id=d0"], "-device", "needs -machine q35"),
        (["-device", "e1000"], "-device", "unknown driver"),
        (["-daemonize", "-serial", "stdio"], "-daemonize", "exclude each other"),
        # What StratoVirt has and pystrato does not: refused by name.
        (["-numa", "node,nodeid=0"], "-numa", "not supported by pystrato yet"),
        (["-object", "memory-backend-ram,id=m,size=1G"], "-object", "not supported by pystrato yet"),
        (["-iothread", "id=io0"], "-iothread", "not supported by pystrato yet"),
        (["-S"], "-S", "not supported by pystrato yet"),
        (["-mon", "chardev=c"], "-mon", "not supported by pystrato yet"),
        (["-device", "virtio-serial-pci,id=s"], "-device", "not supported by pystrato yet"),
    ]


def test_invalid_values_are_refused_before_anything_starts(files):
    d = files["dir"]
    before = set(os.listdir(d))
    failures = []
    for args, option, reason in _refusals(files):
        # -qmp comes first so that options needing a value may end the command line.
        accel = [] if "-accel" in args else ["-accel", "test"]
        code, out, err = run(*accel, "-qmp", f"unix:{files['qmp']},server,nowait", *args, timeout=30)
        lines = err.splitlines()
        ok = (code == 1 and out == "" and len(lines) == 1 and lines[0].startswith("pystrato: ")
              and option in lines[0] and reason in lines[0])
        if not ok:
            failures.append((args, code, err))
        assert not os.path.exists(files["qmp"]), f"{args}: the QMP socket was created"
    assert not failures, "\n".join(f"{a}: exit {c}: {e!r}" for a, c, e in failures)
    # Nothing was left behind (only -D/-serial files the refusal did not get to).
    assert set(os.listdir(d)) == before


def test_daemonize_without_qmp_is_refused():
    code, _, err = run("-accel", "test", "-daemonize")
    assert code == 1 and err.splitlines() == ["pystrato: -daemonize: needs a -qmp socket to be managed through"]


def test_a_bare_word_first_is_refused():
    code, _, err = run("stray", "-accel", "test")
    assert code == 1 and err.splitlines() == ["pystrato: stray: unexpected argument: options start with '-'"]


def test_busy_incoming_port_is_refused_before_qmp(files):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _, err = run("-accel", "test", "-incoming", f"tcp:127.0.0.1:{port}",
                           "-qmp", f"unix:{files['qmp']},server,nowait")
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("pystrato: -incoming: cannot listen on") and "Address already in use" in err
    assert not os.path.exists(files["qmp"])


@pytest.mark.skipif(not os.path.exists("/dev/kvm") or os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="simulating an unopenable /dev/kvm needs root, unshare and /dev/kvm")
@pytest.mark.parametrize("accel", [["-accel", "kvm"], []])
def test_kvm_that_cannot_be_opened_is_refused(files, accel):
    # A private mount namespace where /dev/kvm sits on a nodev mount: open() gets EACCES.
    kernel = elf_kernel(files["dir"] / "k.elf", b"")
    cmd = " ".join([*PYSTRATO, *accel, "-kernel", kernel, "-qmp", f"unix:{files['qmp']},server,nowait"])
    script = f"mount --bind /dev/kvm /dev/kvm && mount -o remount,bind,nodev /dev/kvm && exec {cmd}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          cwd=ROOT, capture_output=True, timeout=TIMEOUT, check=False)
    err = proc.stderr.decode()
    if "mount" in err and "pystrato" not in err:
        pytest.skip(f"cannot make a private mount here: {err.strip()}")
    assert proc.returncode == 1
    assert err.splitlines() == [
        "pystrato: -accel: cannot open /dev/kvm: Permission denied"
        + ("" if accel else " (use -accel test for the in-memory test hypervisor)")]
    assert not os.path.exists(files["qmp"])


# --- help and version ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_prints_usage_and_exits_0(flag):
    code, out, err = run(flag)
    assert (code, err) == (0, "")
    assert out.startswith("Usage: pystrato [OPTION]...")
    for option in OPTIONS:  # every option the parser takes is documented
        assert f"  {option} " in out or f"  {option}\n" in out, option


def test_version_prints_and_exits_0():
    assert run("-version") == (0, f"pystrato {VERSION}\n", "")


def test_help_wins_over_other_options_but_not_as_a_value(files):
    assert run("-m", "12X", "-h")[0] == 0
    # "-h" as the value of -name is a name: the VM runs (killed by the timeout of a short wait).
    proc = subprocess.Popen([*PYSTRATO, "-accel", "test", "-name", "-h", "-qmp",
                             f"unix:{files['qmp']},server,nowait"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(files["qmp"]) or proc.poll() is not None, "the QMP socket")
        assert proc.poll() is None
        q = RawQmp(files["qmp"])
        q.cmd("quit")
        assert proc.wait(TIMEOUT) == 0
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- -daemonize, -pidfile, -D ------------------------------------------------------------------------

def test_daemonize_serves_qmp_keeps_argv_and_cleans_up(files, daemons):
    d = files["dir"]
    pidfile, log, qmp = str(d / "vmm.pid"), d / "vmm.log", files["qmp"]
    args = ["-accel", "test", "-name", "vm1", "-daemonize", "-pidfile", pidfile, "-D", str(log),
            "-qmp", f"unix:{qmp},server,nowait"]
    # capture_output: run() returning at all shows the daemon kept none of our pipes.
    code, out, err = run(*args)
    assert (code, out, err) == (0, "", "")
    pid = int(Path(pidfile).read_text())
    daemons.append(pid)
    assert pid != os.getpid() and not process_ended(pid)
    # QMP is served the moment the parent exits 0: no retry needed.
    q = RawQmp(qmp)
    assert q.execute("query-status")["status"] == "running"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[:-1] == [a.encode() for a in [*PYSTRATO, *args]]
    assert os.getsid(pid) != os.getsid(0)  # its own session, no controlling terminal
    assert os.readlink(f"/proc/{pid}/fd/0") == os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
    assert q.cmd("quit")[-1] == {"return": {}}
    assert q.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    wait_for(lambda: process_ended(pid), "the daemon to exit")
    assert not os.path.exists(pidfile) and not os.path.exists(qmp)
    assert "shutdown: guest=False reason=host-qmp-quit" in log.read_text()


def test_daemon_that_cannot_start_makes_the_parent_fail(files, daemons):
    d = files["dir"]
    pidfile, qmp = str(d / "vmm.pid"), files["qmp"]
    with socket.socket(socket.AF_UNIX) as live:  # someone else serves this QMP path
        live.bind(qmp)
        live.listen(1)
        code, out, err = run("-accel", "test", "-daemonize", "-pidfile", pidfile,
                             "-qmp", f"unix:{qmp},server,nowait")
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"pystrato: QMP socket {qmp}: in use by another process"]
    assert not os.path.exists(pidfile)


def test_second_daemon_on_a_locked_pidfile_is_refused(files, daemons):
    d = files["dir"]
    pidfile = str(d / "vmm.pid")
    assert run("-accel", "test", "-daemonize", "-pidfile", pidfile,
               "-qmp", f"unix:{files['qmp']},server,nowait")[0] == 0
    pid = int(Path(pidfile).read_text())
    daemons.append(pid)
    code, _, err = run("-accel", "test", "-daemonize", "-pidfile", pidfile,
                       "-qmp", f"unix:{d}/other.sock,server,nowait")
    assert code == 1
    assert err.splitlines() == [f"pystrato: -pidfile: '{pidfile}' is locked by another running VMM"]
    assert not os.path.exists(d / "other.sock")
    assert int(Path(pidfile).read_text()) == pid  # the running daemon's file is untouched
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: process_ended(pid), "the daemon to exit")
    assert not os.path.exists(pidfile)


def test_stale_pidfile_is_reused(files):
    pidfile = files["dir"] / "vmm.pid"
    pidfile.write_text("99999999\n")  # left by a VMM that was killed
    proc = subprocess.Popen([*PYSTRATO, "-accel", "test", "-pidfile", str(pidfile),
                             "-qmp", f"unix:{files['qmp']},server,nowait"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(files["qmp"]), "the QMP socket")
        q = RawQmp(files["qmp"])
        assert int(pidfile.read_text()) == proc.pid  # written before QMP is served
        q.cmd("quit")
        assert proc.wait(TIMEOUT) == 0
        assert not pidfile.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- running VMM: signals, several QMP sockets, -serial file:, -name/-uuid -----------------------------

class Vmm:
    def __init__(self, *args, qmp_paths):
        self.qmp_paths = qmp_paths
        qmp_args = [a for p in qmp_paths for a in ("-qmp", f"unix:{p},server,nowait")]
        self.proc = subprocess.Popen([*PYSTRATO, "-accel", "test", *args, *qmp_args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        wait_for(lambda: all(os.path.exists(p) for p in qmp_paths) or self.proc.poll() is not None,
                 "the QMP sockets")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def vmms():
    started: list[Vmm] = []

    def start(*args, qmp_paths):
        v = Vmm(*args, qmp_paths=qmp_paths)
        started.append(v)
        return v

    yield start
    for v in started:
        v.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_ends_the_vmm_with_shutdown_host_signal_on_every_qmp_socket(vmms, tmp_path, sig):
    paths = [str(tmp_path / f"q{i}.sock") for i in range(3)]
    log = tmp_path / "vmm.log"
    v = vmms("-name", "guest-1", "-uuid", "12345678-1234-5678-9abc-123456789abc", "-D", str(log),
             qmp_paths=paths)
    clients = [RawQmp(p) for p in paths]
    # An event caused through one socket reaches every socket.
    assert clients[1].cmd("stop")[-1] == {"return": {}}
    for c in (clients[0], clients[2]):
        assert c.wait_event("STOP")["event"] == "STOP"
    v.proc.send_signal(sig)
    for c in clients:
        assert c.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
    assert v.proc.wait(TIMEOUT) == 0
    assert v.proc.stderr.read() == b""
    assert not any(os.path.exists(p) for p in paths)
    text = log.read_text()
    assert "shutdown: guest=False reason=host-signal" in text
    assert all(f"QMP listening on {p}" in text for p in paths)


def test_serial_file_gets_guest_output_appended(vmms, tmp_path):
    serial = tmp_path / "serial.log"
    serial.write_bytes(b"earlier run\n")
    kernel = elf_kernel(tmp_path / "hello.elf", serial_writer(b"hello from COM1\n"))
    v = vmms("-kernel", kernel, "-serial", f"file:{serial}", qmp_paths=[str(tmp_path / "q.sock")])
    wait_for(lambda: serial.read_bytes().endswith(b"hello from COM1\n"), "the guest's serial output")
    assert serial.read_bytes() == b"earlier run\nhello from COM1\n"
    RawQmp(v.qmp_paths[0]).cmd("quit")
    assert v.proc.wait(TIMEOUT) == 0


def test_log_to_stderr_with_bare_D(vmms, tmp_path):
    v = vmms("-D", qmp_paths=[str(tmp_path / "q.sock")])
    RawQmp(v.qmp_paths[0]).cmd("quit")
    assert v.proc.wait(TIMEOUT) == 0
    err = v.proc.stderr.read().decode()
    assert "QMP listening on" in err and "reason=host-qmp-quit" in err


def test_the_console_script_serves_qmp_with_the_collector_back_on(tmp_path):
    """`.venv/bin/pystrato` — application.launch, the collector off during start-up — serves
    QMP and quits cleanly (the collector's return is the next test's)."""
    exe = Path(sys.executable).parent / "pystrato"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (scripts/setup installs it)")
    sock = str(tmp_path / "qmp.sock")
    proc = subprocess.Popen([str(exe), "-accel", "test", "-qmp", f"unix:{sock},server,nowait"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, "the QMP socket")
        c = RawQmp(sock)
        assert c.execute("query-status")["status"] == "running"
        c.execute("quit")
        c.close()
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_launcher_defers_the_collector_and_start_up_restores_it():
    code = ("import gc, application.launch as l; off = not gc.isenabled(); "
            "from application.cli import _end_startup; _end_startup(); "
            "print(off, gc.isenabled(), gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         timeout=TIMEOUT, check=True).stdout.decode()
    assert out.split() == ["True", "True", "True"]
    # Where the collector was on (python -m application.cli, tests), nothing is frozen.
    code = ("import gc; from application.cli import _end_startup; _end_startup(); "
            "print(gc.isenabled(), gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         timeout=TIMEOUT, check=True).stdout.decode()
    assert out.split() == ["True", "0"]
