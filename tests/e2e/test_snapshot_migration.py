"""Snapshots, restore and live migration end to end: real `pystrato -accel test` processes,
real files and sockets, driven by qemu.qmp's QMPClient (raw sockets for the guest "toucher").

How "the destination has the source's memory at the moment it paused" is established:
  * `migrate` with "verify": true makes the source send a SHA-256 of guest RAM taken after the
    vCPUs stopped; the destination refuses the migration if its RAM differs;
  * independently, a reference VM replays the same x-guest-touch calls, in the same order, that
    the source confirmed before it paused (a paused guest cannot write: x-guest-touch is refused
    from then on), and its digest must equal the destination's x-query-memory-digest.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zlib

import pytest
from qemu.qmp import ExecuteError

from tests.e2e.migration_kit import (
    Toucher,
    Vmm,
    free_port,
    qmp_session,
    replay_digest,
    run_cli,
    sha256_file,
    still_writing,
    until_source_exits,
    wait_exit,
    wait_status,
    wait_transferred,
)
from tests.stream_proxy import StreamProxy

MIB = 1 << 20
MICROVM = ["-machine", "microvm", "-smp", "2", "-m", "256"]
Q35 = ["-machine", "q35", "-smp", "2", "-m", "256"]
BIG_MICROVM = ["-machine", "microvm", "-smp", "2", "-m", "512"]
BIG_Q35 = ["-machine", "q35", "-smp", "2", "-m", "512"]
STATUS_RUNNING = {"running": True, "singlestep": False, "status": "running"}
STATUS_PAUSED = {"running": True, "singlestep": False, "status": "paused"}  # the manual's reply


# tmpfs when there is one: files are as real, and removing a fragmented snapshot from a slow
# virtual disk can take seconds per test.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"


@pytest.fixture
def work():
    """A short directory (unix socket paths are limited to 108 bytes) and a process reaper."""
    d = tempfile.mkdtemp(prefix="pst-", dir=SCRATCH)
    procs: list[Vmm] = []

    def start(name: str, args: list[str], **kw) -> Vmm:
        v = Vmm(d, name, args, **kw)
        procs.append(v)
        return v

    start.dir = d
    start.procs = procs
    yield start
    for p in procs:
        p.kill()
    shutil.rmtree(d, ignore_errors=True)


def copy_snapshot(src: str, dst: str) -> None:
    """Copy keeping the memory file's holes (a plain copy writes every zero page)."""
    subprocess.run(["cp", "-a", "--sparse=always", src, dst], check=True)


def dir_digest(d: str) -> dict[str, str]:
    return {n: sha256_file(os.path.join(d, n)) for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n))}


def cpus_shape(cpus: list[dict]) -> list[dict]:
    """query-cpus without what differs between two processes (thread ids)."""
    out = []
    for c in cpus:
        assert set(c) == {"CPU", "arch", "current", "halted", "props", "qom_path", "thread_id"}
        assert isinstance(c["thread_id"], int) and c["thread_id"] > 0
        out.append({k: v for k, v in c.items() if k != "thread_id"})
    return out


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {stderr!r}"
    assert lines[0].startswith("pystrato: ")
    return lines[0]


async def digest(qmp) -> str:
    return (await qmp.execute("x-query-memory-digest"))["sha256"]


async def touch_all(qmp, touches) -> None:
    """The fake guest writes (pages, seed) for each touch, in order."""
    for pages, seed in touches:
        await qmp.execute("x-guest-touch", {"pages": pages, "seed": seed})


async def execute_until_event(qmp, command: str, event: str) -> dict:
    """Run command and return its reply once the VM has sent ``event`` (stop: STOP, cont: RESUME)."""
    with qmp.listener() as events:
        reply = await qmp.execute(command)
        assert (await asyncio.wait_for(events.get(), 5))["event"] == event
    return reply


def assert_runs_with(vmm: Vmm, want: str) -> None:
    """vmm (restored or migrated into) is running, with memory digest ``want``."""
    async def check():
        async with qmp_session(vmm) as q:
            assert await q.execute("query-status") == STATUS_RUNNING
            assert await digest(q) == want

    asyncio.run(check())


def assert_incoming_refused(workdir: str, args: list[str], snap: str, why: str) -> None:
    """-incoming from a snapshot, a unix and a TCP listener: each refused in one line naming why."""
    for uri, verb in ((f"file:{snap}", "restore a snapshot into"),
                      (f"unix:{workdir}/in.sock", "migrate into"), ("tcp:127.0.0.1:4447", "migrate into")):
        r = run_cli(["-accel", "test", *args, "-incoming", uri])
        assert r.returncode == 1
        assert one_line(r.stderr) == f"pystrato: -incoming: cannot {verb} a VM with {why}"


async def take_snapshot(vmm: Vmm, snap: str, touches: list[tuple[int, int]] = ()) -> str:
    """Touch, stop, snapshot into snap; returns the memory digest at that moment."""
    os.makedirs(snap, exist_ok=True)
    async with qmp_session(vmm) as q:
        await touch_all(q, touches)
        await q.execute("stop")
        assert await q.execute("migrate", {"uri": f"file:{snap}"}) == {}
        assert await wait_status(q) == {"status": "completed"}
        assert await q.execute("query-status") == STATUS_PAUSED
        return await digest(q)


# ---------------------------------------------------------------------------------------------
# Snapshot and restore
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("machine", [MICROVM, Q35], ids=["microvm", "q35"])
def test_snapshot_then_restore(work, machine):
    snap = os.path.join(work.dir, "template")
    os.mkdir(snap)
    src = work("src", machine)

    async def save():
        async with qmp_session(src) as q:
            await q.execute("x-guest-touch", {"pages": 3000, "seed": 7})
            with pytest.raises(ExecuteError) as ei:
                await q.execute("migrate", {"uri": f"file:{snap}"})
            assert ei.value.error_class == "GenericError"
            assert "paused" in str(ei.value) and "stop" in str(ei.value)
            assert await q.execute("query-migrate") == {"status": "none"}
            assert os.listdir(snap) == []

            assert await execute_until_event(q, "stop", "STOP") == {}
            assert await q.execute("query-status") == STATUS_PAUSED
            with pytest.raises(ExecuteError, match="not running"):  # a paused guest writes nothing
                await q.execute("x-guest-touch", {"pages": 1, "seed": 1})

            # A write error ends the job failed; the VM stays paused and can try again.
            with pytest.raises(ExecuteError) as ei:
                await q.execute("migrate", {"uri": f"file:{snap}/missing"})
            assert "cannot write snapshot" in str(ei.value) and "No such file" in str(ei.value)
            info = await q.execute("query-migrate")
            assert info["status"] == "failed" and "No such file" in info["error-desc"]
            assert await q.execute("query-status") == STATUS_PAUSED

            assert await q.execute("migrate", {"uri": f"file:{snap}"}) == {}  # returns at once
            assert await wait_status(q) == {"status": "completed"}
            assert await q.execute("query-status") == STATUS_PAUSED
            return await digest(q), await q.execute("query-cpus")

    want_digest, want_cpus = asyncio.run(save())
    assert sorted(os.listdir(snap)) == ["memory", "state"]
    st = os.stat(os.path.join(snap, "memory"))
    assert st.st_size == 256 * MIB
    assert st.st_blocks * 512 < 64 * MIB  # zero pages are holes
    files = dir_digest(snap)

    dst = work("dst", [*machine, "-incoming", f"file:{snap}"])

    async def restored():
        async with qmp_session(dst) as q:
            assert await q.execute("query-status") == STATUS_RUNNING
            assert await digest(q) == want_digest
            assert cpus_shape(await q.execute("query-cpus")) == cpus_shape(want_cpus)
            assert (await q.execute("query-migrate"))["status"] == "completed"
            # The restored VM is an ordinary VM: it pauses, resumes, and its guest writes.
            await execute_until_event(q, "stop", "STOP")
            assert await q.execute("query-status") == STATUS_PAUSED
            await execute_until_event(q, "cont", "RESUME")
            await q.execute("x-guest-touch", {"pages": 500, "seed": 8})
            assert await digest(q) != want_digest
            await q.execute("quit")

    asyncio.run(restored())
    assert dst.wait() == 0
    # The guest's writes went to private copies: the template is unchanged.
    assert dir_digest(snap) == files

    async def source_still_fine():
        async with qmp_session(src) as q:
            assert await digest(q) == want_digest
            await q.execute("cont")
            assert await q.execute("query-status") == STATUS_RUNNING
            await q.execute("quit")

    asyncio.run(source_still_fine())
    assert src.wait() == 0


def test_restored_vm_snapshots_over_its_own_template(work):
    """The template a VM runs from is replaced, not rewritten: the running VM keeps its pages,
    and the new snapshot restores to what that VM had."""
    snap = os.path.join(work.dir, "template")
    src = work("src", MICROVM)
    first = asyncio.run(take_snapshot(src, snap, [(2000, 1)]))
    src.kill()
    vm = work("vm", [*MICROVM, "-incoming", f"file:{snap}"])

    async def resnapshot():
        async with qmp_session(vm) as q:
            assert await digest(q) == first
            await q.execute("x-guest-touch", {"pages": 2000, "seed": 2})
        second = await take_snapshot(vm, snap)
        async with qmp_session(vm) as q:
            assert await digest(q) == second != first
            await q.execute("cont")
            await q.execute("x-guest-touch", {"pages": 10, "seed": 3})
        return second

    second = asyncio.run(resnapshot())
    assert_runs_with(work("again", [*MICROVM, "-incoming", f"file:{snap}"]), second)


def test_five_vms_from_one_template_at_once(work):
    snap = os.path.join(work.dir, "template")
    src = work("src", MICROVM)
    want = asyncio.run(take_snapshot(src, snap, [(4000, 1), (4000, 2)]))
    src.kill()
    files = dir_digest(snap)

    vms = [work(f"vm{i}", [*MICROVM, "-incoming", f"file:{snap}"], wait=False) for i in range(5)]
    for v in vms:
        v.wait_ready(timeout=180)  # five interpreters starting at once on a small, busy host

    async def check():
        digests = []
        for i, v in enumerate(vms):
            async with qmp_session(v) as q:
                assert await q.execute("query-status") == STATUS_RUNNING
                assert await digest(q) == want
                await q.execute("x-guest-touch", {"pages": 100, "seed": 100 + i})
                digests.append(await digest(q))
        assert len(set(digests)) == 5  # each guest diverges on its own copy
        for v in vms:
            async with qmp_session(v) as q:
                await q.execute("quit")

    asyncio.run(check())
    assert [v.wait() for v in vms] == [0] * 5
    assert dir_digest(snap) == files


# ---------------------------------------------------------------------------------------------
# The snapshot write runs in the background
#
# Ordering, not timing: the snapshot directory is on an ext4 file system that the test freezes
# (fsfreeze). The writer blocks in its first file creation until the test thaws it, so whatever
# QMP answers before the thaw was answered while the snapshot was being written.
# ---------------------------------------------------------------------------------------------


class FrozenDir:
    """An ext4 file system on a loop device whose writes the test holds back (fsfreeze)."""

    def __init__(self, workdir: str, size_mib: int):
        self.image = os.path.join(workdir, "fs.img")
        self.path = os.path.join(workdir, "mnt")
        self.frozen = False
        os.mkdir(self.path)
        with open(self.image, "wb") as f:
            f.truncate(size_mib * MIB)
        subprocess.run(["mkfs.ext4", "-q", "-F", self.image], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", self.image, self.path], check=True, capture_output=True)

    def freeze(self) -> None:
        os.sync()
        subprocess.run(["fsfreeze", "-f", self.path], check=True, capture_output=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", self.path], check=True, capture_output=True)
            self.frozen = False

    def close(self) -> None:
        """Thaw and unmount. Whoever still has files open on it must be gone first, or the
        mount (and the tmpfs behind its loop device) outlives the test."""
        self.thaw()
        if subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", self.path], check=True, capture_output=True)


@pytest.fixture
def frozen(work):
    """Depends on ``work`` so that it is torn down first: a process blocked on the frozen file
    system cannot be killed until the file system thaws."""
    if os.geteuid() != 0 or not shutil.which("fsfreeze") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root, loop devices and fsfreeze")
    try:
        fs = FrozenDir(work.dir, 256)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount an ext4 image here: {e}")
    yield fs
    fs.thaw()  # the VMMs may be blocked on it: they can die only once it thaws
    for p in work.procs:
        p.kill()
    fs.close()


BIG_TOUCH = [(15000, 31), (15000, 32)]  # up to ~120 MiB of data in a 512 MiB guest


async def gated_snapshot_started(q, fs: FrozenDir, snap: str) -> dict:
    """Freeze, start the snapshot, return query-migrate once the writer is active (blocked in
    its first file creation: it cannot get further before the thaw)."""
    fs.freeze()
    assert await q.execute("migrate", {"uri": f"file:{snap}"}) == {}
    return await wait_status(q, done=("active",))


def test_qmp_answers_while_a_large_snapshot_is_written(work, frozen):
    snap = os.path.join(frozen.path, "snap")
    os.mkdir(snap)
    vm = work("vm", BIG_MICROVM)

    async def run():
        async with qmp_session(vm) as q:
            await touch_all(q, BIG_TOUCH)
            await q.execute("stop")
            want = await digest(q)
            try:
                info = await gated_snapshot_started(q, frozen, snap)
                # Progress figures while the snapshot is written (nothing written yet: frozen).
                assert {"total-time", "setup-time", "ram"} <= set(info), info
                assert info["ram"]["total"] == 512 * MIB and info["ram"]["remaining"] == 512 * MIB
                # Other commands answer meanwhile; the vCPUs stay stopped.
                assert await q.execute("query-status") == {"running": False, "singlestep": False,
                                                           "status": "save-vm"}
                assert (await q.execute("query-migrate"))["status"] == "active"
                assert len(await q.execute("query-cpus")) == 2
                assert await digest(q) == want
                # A second job is refused, whatever its kind.
                for uri in (f"file:{snap}", f"unix:{work.dir}/m.sock"):
                    with pytest.raises(ExecuteError, match="already in progress .status 'active'"):
                        await q.execute("migrate", {"uri": uri})
                # The memory must not change under the writer: 'cont' is refused, clearly.
                with pytest.raises(ExecuteError) as ei:
                    await q.execute("cont")
                assert ei.value.error_class == "GenericError"
                assert "snapshot is being written" in str(ei.value)
                with pytest.raises(ExecuteError, match="not running"):
                    await q.execute("x-guest-touch", {"pages": 1, "seed": 1})
                assert await q.execute("stop") == {}  # as QEMU: nothing runs, nothing to stop
                assert (await q.execute("query-migrate"))["status"] == "active"
                assert os.listdir(snap) == []
            finally:
                frozen.thaw()
            assert await wait_status(q) == {"status": "completed"}
            assert await q.execute("query-status") == STATUS_PAUSED
            assert await digest(q) == want
            await q.execute("quit")
        return want

    want = asyncio.run(run())
    assert vm.wait() == 0
    assert sorted(os.listdir(snap)) == ["memory", "state"]
    assert re.search(r"snapshot written to .* \(\d+ MiB of data", vm.log()), vm.log()
    assert_runs_with(work("restored", [*BIG_MICROVM, "-incoming", f"file:{snap}"]), want)


def test_cancel_during_a_snapshot_keeps_the_vm_and_the_old_snapshot(work, frozen):
    snap = os.path.join(frozen.path, "snap")
    vm = work("vm", BIG_MICROVM)
    old = asyncio.run(take_snapshot(vm, snap, [(10000, 41)]))
    old_files = dir_digest(snap)
    other = os.path.join(frozen.path, "other")  # no snapshot there yet
    after = os.path.join(frozen.path, "after")
    os.mkdir(other)
    os.mkdir(after)

    async def run():
        async with qmp_session(vm) as q:
            await q.execute("cont")
            await q.execute("x-guest-touch", {"pages": 10000, "seed": 42})
            await q.execute("stop")
            want = await digest(q)
            assert want != old
            for target in (snap, other):
                try:
                    await gated_snapshot_started(q, frozen, target)
                    assert await q.execute("migrate_cancel") == {}
                    # The writer is held back by the frozen file system: the cancel is pending.
                    assert (await q.execute("query-migrate"))["status"] == "cancelling"
                    with pytest.raises(ExecuteError, match="snapshot is being written"):
                        await q.execute("cont")
                finally:
                    frozen.thaw()
                assert await wait_status(q) == {"status": "cancelled"}
                assert await q.execute("query-status") == STATUS_PAUSED
                assert await digest(q) == want  # the VM is intact
            # Nothing half-written is left: the old snapshot is as it was, the empty dir empty.
            assert dir_digest(snap) == old_files
            assert os.listdir(other) == []
            # A restore from the cancelled target is refused.
            r = await asyncio.to_thread(run_cli, ["-accel", "test", *BIG_MICROVM, "-incoming", f"file:{other}"])
            assert r.returncode == 1 and "No such file" in one_line(r.stderr)
            # The VM still works: it runs again, and a snapshot after the cancel succeeds.
            assert await execute_until_event(q, "cont", "RESUME") == {}
            await q.execute("stop")
            assert await q.execute("migrate", {"uri": f"file:{after}"}) == {}
            assert await wait_status(q) == {"status": "completed"}
            return want

    want = asyncio.run(run())
    # The old snapshot restores to what it held, the one after the cancel to the VM at that time.
    restored_old = work("old", [*BIG_MICROVM, "-incoming", f"file:{snap}"])
    restored_new = work("new", [*BIG_MICROVM, "-incoming", f"file:{after}"])

    async def check():
        async with qmp_session(restored_old) as q:
            assert await digest(q) == old
        async with qmp_session(restored_new) as q:
            assert await digest(q) == want

    asyncio.run(check())


# ---------------------------------------------------------------------------------------------
# Live migration
# ---------------------------------------------------------------------------------------------


def incoming_uri(kind: str, workdir: str) -> str:
    if kind == "unix":
        return f"unix:{workdir}/migrate.sock"
    return f"tcp:127.0.0.1:{free_port()}"


def expected_digest(workdir: str, args: list[str], pre: list[tuple[int, int]], toucher: Toucher) -> set[str]:
    """Replayed digest(s) of the source at its pause; two when the toucher's last reply was lost."""
    out = {replay_digest(workdir, args, pre + toucher.applied)}
    if toucher.unknown is not None:
        out.add(replay_digest(workdir, args, pre + toucher.applied + [toucher.unknown], "reference2"))
    return out


async def migrate_while_touching(src: Vmm, uri: str, toucher: Toucher, size: int,
                                 light_pages: int) -> list[dict]:
    """Start the migration with verify while the toucher writes; poll query-migrate until the
    source goes away and return what the polls saw. The toucher writes hard during the full
    pass (so the dirty rounds have real work) and lightly from the first dirty round on (so
    the migration converges)."""
    seen: list[dict] = []

    def shape_load(info: dict) -> None:
        # dirty-sync-count 2: the first dirty round was sent, the next one is being read.
        if info["status"] == "active" and info["ram"]["dirty-sync-count"] >= 2:
            toucher.pages = light_pages

    async with qmp_session(src, "source") as q:
        toucher.start()
        while len(toucher.applied) < 3 and toucher.is_alive():
            await asyncio.sleep(0.01)
        assert await q.execute("migrate", {"uri": uri, "verify": True}) == {}
        toucher.at_migrate = len(toucher.applied)
        await until_source_exits(q, seen, poll=0.02, on_info=shape_load)
    for info in seen:
        if info["status"] == "active":
            assert info["ram"]["total"] == size
    return seen


@pytest.mark.parametrize("transport,machine", [("unix", BIG_MICROVM), ("tcp", BIG_Q35)],
                         ids=["unix-microvm", "tcp-q35"])
def test_live_migration_with_a_guest_dirtying_memory(work, transport, machine):
    uri = incoming_uri(transport, work.dir)
    src = work("src", machine)
    dst = work("dst", [*machine, "-incoming", uri])
    pre = [(15000, 1), (15000, 2)]

    async def prepare():
        async with qmp_session(dst) as q:
            assert await q.execute("query-status") == {"running": False, "singlestep": False,
                                                       "status": "inmigrate"}
            assert await q.execute("query-migrate") == {"status": "none"}
            with pytest.raises(ExecuteError, match="Migration is not complete"):
                await q.execute("cont")
        async with qmp_session(src) as q:
            await touch_all(q, pre)

    asyncio.run(prepare())
    toucher = Toucher(src, pages=2000)
    seen = asyncio.run(migrate_while_touching(src, uri, toucher, 512 * MIB, light_pages=20))
    assert src.wait(60) == 0, src.stderr()
    toucher.stop()
    # The guest kept writing during the transfer, and could not once the source paused.
    assert len(toucher.applied) - toucher.at_migrate >= 3
    assert toucher.refused is None or "not running" in toucher.refused
    active = [s for s in seen if s["status"] == "active"]
    assert active and max(s["ram"]["dirty-sync-count"] for s in active) >= 1  # dirty rounds ran
    assert max(s["ram"]["transferred"] for s in active) > 0
    log = src.log()
    done = re.search(r"migration completed: \d+ MiB sent in (\d+) rounds, (\d+) ms total", log)
    assert done, log
    # The full pass, at least one round of dirty pages sent while the guest ran, the final pass.
    assert int(done.group(1)) >= 3, log
    if int(done.group(2)) >= 2000:  # the log shows progress once a second
        assert "migration: round" in log, log

    async def on_destination():
        async with qmp_session(dst) as q:
            assert await q.execute("query-status") == STATUS_RUNNING
            assert (await q.execute("query-migrate"))["status"] == "completed"
            got = await digest(q)
            await q.execute("x-guest-touch", {"pages": 10, "seed": 5})  # a live guest
            await q.execute("quit")
            return got

    got = asyncio.run(on_destination())
    assert dst.wait() == 0
    assert "memory digest verified" in dst.log()
    assert got in expected_digest(work.dir, machine, pre, toucher)


def test_idle_guest_migrates_each_page_once(work):
    """An idle guest converges at once: the full pass, one dirty read that finds (almost)
    nothing, the final pass; the pages the engine read to send are not dirty again."""
    uri = incoming_uri("unix", work.dir)
    src = work("src", BIG_MICROVM)
    dst = work("dst", [*BIG_MICROVM, "-incoming", uri])

    async def run():
        async with qmp_session(src) as q:
            await q.execute("x-guest-touch", {"pages": 20000, "seed": 9})  # <= 78 MiB of data
            assert await q.execute("migrate", {"uri": uri}) == {}
            await until_source_exits(q, [], poll=0.02)

    asyncio.run(run())
    assert src.wait(60) == 0, src.stderr()
    done = re.search(r"migration completed: (\d+) MiB sent in (\d+) rounds", src.log())
    assert done, src.log()
    assert int(done.group(2)) <= 3, src.log()
    assert int(done.group(1)) <= 90, src.log()  # once, not once per round

    async def on_destination():
        async with qmp_session(dst) as q:
            assert await q.execute("query-status") == STATUS_RUNNING
            await q.execute("quit")

    asyncio.run(on_destination())
    assert dst.wait() == 0


def test_cancel_mid_transfer(work):
    uri = incoming_uri("unix", work.dir)
    src = work("src", BIG_MICROVM)
    dst = work("dst", [*BIG_MICROVM, "-incoming", uri])
    pre = [(30000, 1), (30000, 2)]
    # Writing fast and without pause, the guest keeps the migration from converging.
    toucher = Toucher(src, pages=2000)

    async def cancel():
        async with qmp_session(src) as q:
            await touch_all(q, pre)
            toucher.start()
            assert await q.execute("migrate", {"uri": uri}) == {}
            info = await wait_transferred(q, 32 * MIB)
            assert {"total-time", "setup-time", "expected-downtime", "ram"} <= set(info)
            assert {"total", "transferred", "remaining", "duplicate", "normal", "mbps",
                    "dirty-pages-rate", "dirty-sync-count"} <= set(info["ram"])
            with pytest.raises(ExecuteError, match="already in progress"):
                await q.execute("migrate", {"uri": uri})
            assert await q.execute("migrate_cancel") == {}
            info = await wait_status(q)
            assert info["status"] == "cancelled", info
            assert await q.execute("query-status") == STATUS_RUNNING
            assert len(await digest(q)) == 64
            await still_writing(toucher)

    asyncio.run(cancel())
    assert dst.wait(30) == 0
    assert "migration cancelled by source" in dst.log()
    assert "migration cancelled" in src.log()

    # The source is intact: migrating it again works, and carries every write.
    dst2 = work("dst2", [*BIG_MICROVM, "-incoming", uri])
    toucher.stop()
    assert toucher.refused is None and toucher.unknown is None

    async def again():
        async with qmp_session(src) as q:
            assert await q.execute("migrate", {"uri": uri, "verify": True}) == {}
            await until_source_exits(q)
        async with qmp_session(dst2) as q:
            assert await q.execute("query-status") == STATUS_RUNNING
            return await digest(q)

    got = asyncio.run(again())
    assert src.wait(60) == 0
    assert got == replay_digest(work.dir, BIG_MICROVM, pre + toucher.applied)


def test_destination_killed_mid_transfer(work):
    """A lost connection (the destination host dies) ends in failed; the source runs on."""
    uri = incoming_uri("tcp", work.dir)
    src = work("src", BIG_MICROVM)
    dst = work("dst", [*BIG_MICROVM, "-incoming", uri])

    pre = [(30000, 1), (30000, 2)]
    toucher = Toucher(src, pages=2000)  # keeps the transfer from converging before the kill

    async def run():
        async with qmp_session(src) as q:
            await touch_all(q, pre)
            toucher.start()
            assert await q.execute("migrate", {"uri": uri}) == {}
            await wait_transferred(q, 16 * MIB)
            dst.kill()
            info = await wait_status(q)
            assert info["status"] == "failed", info
            assert "connection" in info["error-desc"], info
            assert await q.execute("query-status") == STATUS_RUNNING
            await still_writing(toucher)
            toucher.stop()
            # Nothing was lost on the source: its memory is what the guest wrote there.
            assert await digest(q) == replay_digest(work.dir, BIG_MICROVM, pre + toucher.applied)

    asyncio.run(run())
    assert "the VM keeps running here" in src.log()


def test_paused_vm_migrates_and_stays_paused(work):
    uri = incoming_uri("unix", work.dir)
    small = ["-machine", "microvm", "-smp", "1", "-m", "128"]
    src = work("src", small)
    dst = work("dst", [*small, "-incoming", uri])

    async def run():
        async with qmp_session(src) as q:
            await q.execute("x-guest-touch", {"pages": 1000, "seed": 9})
            await q.execute("stop")
            want = await digest(q)
            assert await q.execute("migrate", {"uri": uri, "verify": True}) == {}
            await until_source_exits(q)
        async with qmp_session(dst) as q:
            assert await q.execute("query-status") == STATUS_PAUSED
            assert await digest(q) == want
            await execute_until_event(q, "cont", "RESUME")
            assert await q.execute("query-status") == STATUS_RUNNING
            await q.execute("quit")

    asyncio.run(run())
    assert src.wait(30) == 0 and dst.wait() == 0


def test_migration_to_nowhere_fails_and_the_source_runs_on(work):
    src = work("src", MICROVM)

    async def run():
        async with qmp_session(src) as q:
            before = await digest(q)
            assert await q.execute("migrate_cancel") == {}  # nothing to cancel
            assert await q.execute("query-migrate") == {"status": "none"}
            assert await q.execute("migrate", {"uri": f"unix:{work.dir}/nobody.sock"}) == {}
            info = await wait_status(q)
            assert info["status"] == "failed" and "cannot connect" in info["error-desc"]
            assert await q.execute("query-status") == STATUS_RUNNING
            assert await digest(q) == before
            with pytest.raises(ExecuteError, match="unsupported scheme .exec."):
                await q.execute("migrate", {"uri": "exec:cat > /dev/null"})
            with pytest.raises(ExecuteError, match="'blk' is not supported"):
                await q.execute("migrate", {"uri": f"unix:{work.dir}/x", "blk": True})

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# Exclusion rules (the manual's 互斥特性 / 约束与限制)
# ---------------------------------------------------------------------------------------------

# Configurations this host can run: the VM starts, then snapshot and migration are refused.
RUNNABLE_BLOCKERS = {
    "balloon-mmio": (["-machine", "microvm", "-m", "256",
                      "-device", "virtio-balloon-device,id=balloon0"], "balloon device 'balloon0'"),
    "balloon-pci": (["-machine", "q35", "-m", "256",
                     "-device", "virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x4"], "balloon device 'balloon0'"),
    "mem-share": (["-machine", "microvm,mem-share=on", "-m", "256"], "shared memory (mem-share=on)"),
    "mem-path": (["-machine", "microvm", "-m", "256", "-mem-path", "{dir}"],
                 "memory backend file (mem-path={dir})"),
}


def _hugetlbfs() -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "hugetlbfs":
                return parts[1]
    return None


# Huge pages are expressed as on StratoVirt's and QEMU's command line: -mem-path on hugetlbfs.
if _hugetlbfs():
    RUNNABLE_BLOCKERS["hugepages"] = (["-machine", "microvm", "-m", "256", "-mem-path", _hugetlbfs()],
                                      f"memory backend file (mem-path={_hugetlbfs()})")


@pytest.mark.parametrize("case", sorted(RUNNABLE_BLOCKERS))
def test_exclusion_rules_refuse_snapshot_and_migration(work, case):
    args, why = RUNNABLE_BLOCKERS[case]
    args = [a.replace("{dir}", work.dir) for a in args]
    why = why.replace("{dir}", work.dir)
    snap = os.path.join(work.dir, "snap")
    os.mkdir(snap)
    vm = work("vm", args)

    async def run():
        async with qmp_session(vm) as q:
            for uri in (f"unix:{work.dir}/m.sock", "tcp:127.0.0.1:4446"):
                with pytest.raises(ExecuteError) as ei:
                    await q.execute("migrate", {"uri": uri})
                assert str(ei.value) == f"live migration is not possible with {why}"
            assert await q.execute("query-status") == STATUS_RUNNING
            await q.execute("stop")
            with pytest.raises(ExecuteError) as ei:
                await q.execute("migrate", {"uri": f"file:{snap}"})
            assert str(ei.value) == f"snapshot is not possible with {why}"
            assert await q.execute("query-migrate") == {"status": "none"}
            assert await q.execute("query-status") == STATUS_PAUSED

    asyncio.run(run())
    assert os.listdir(snap) == []
    assert_incoming_refused(work.dir, args, snap, why)


# Configurations this host cannot run (no vhost-net, no VFIO device): -incoming refuses them
# before anything else is looked at.
def test_exclusion_rules_refuse_incoming_vhost_and_vfio(work):
    snap = os.path.join(work.dir, "snap")
    os.mkdir(snap)
    cases = {
        "vhost-net netdev 'net0'": ["-machine", "microvm", "-m", "256", "-netdev",
                                    "tap,id=net0,ifname=pstvh0,vhost=on",
                                    "-device", "virtio-net-device,netdev=net0,id=net0"],
        "vfio device 'vf0'": ["-machine", "q35", "-m", "256",
                              "-device", "vfio-pci,id=vf0,host=0000:1a:00.3,bus=pcie.0,addr=0x5"],
    }
    for why, args in cases.items():
        assert_incoming_refused(work.dir, args, snap, why)


# ---------------------------------------------------------------------------------------------
# Compatibility rules (smp, memory size, device set and addresses, MAC)
# ---------------------------------------------------------------------------------------------


def _q35_devices(tag: str, *, cpus=2, mem=256, blk_addr=3, mac="52:54:00:12:34:56", blk=True,
                 image: str) -> list[str]:
    out = ["-machine", "q35", "-smp", str(cpus), "-m", str(mem)]
    if blk:
        out += ["-drive", f"file={image},id=disk0",
                "-device", f"virtio-blk-pci,drive=disk0,id=disk0,bus=pcie.0,addr={blk_addr:#x}"]
    out += ["-netdev", f"tap,id=net0,ifname=pst{os.getpid() % 100000}{tag}",
            "-device", f"virtio-net-pci,netdev=net0,id=net0,mac={mac},bus=pcie.0,addr=0x5"]
    return out


COMPAT_CASES = {
    "smp": (dict(cpus=1), "smp differs: source cpus=2"),
    "memory": (dict(mem=512), "memory size differs: source 268435456, destination 536870912"),
    "device-set": (dict(blk=False), "device 'disk0' (virtio-blk-pci) is missing on the destination"),
    "device-address": (dict(blk_addr=4), "device 'disk0' addr differs: source 0x3.0, destination 0x4.0"),
    "mac": (dict(mac="52:54:00:12:34:57"),
            "device 'net0' mac differs: source 52:54:00:12:34:56, destination 52:54:00:12:34:57"),
}


@pytest.mark.skipif(not os.access("/dev/net/tun", os.R_OK | os.W_OK) or os.geteuid() != 0,
                    reason="needs /dev/net/tun and root (tap devices)")
@pytest.mark.parametrize("case", sorted(COMPAT_CASES))
def test_compatibility_rules_refuse_migration_and_restore(work, case):
    changes, why = COMPAT_CASES[case]
    image = os.path.join(work.dir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(8 * MIB)
    src_args = _q35_devices("s", image=image)
    bad_args = _q35_devices("d", image=image, **changes)
    uri = incoming_uri("unix", work.dir)
    src = work("src", src_args)
    dst = work("dst", [*bad_args, "-incoming", uri])

    async def run():
        async with qmp_session(src) as q:
            await q.execute("x-guest-touch", {"pages": 100, "seed": 3})
            before = await digest(q)
            assert await q.execute("migrate", {"uri": uri}) == {}
            info = await wait_status(q)
            assert info["status"] == "failed"
            assert info["error-desc"].startswith("destination refused the migration: ")
            assert why in info["error-desc"]
            assert await q.execute("query-status") == STATUS_RUNNING
            assert await digest(q) == before

    asyncio.run(run())
    assert dst.wait(30) == 1
    assert "incoming migration refused" in dst.log() and why in dst.log()

    # The same rule guards a restore: the snapshot of the source, a mismatched command line.
    snap = os.path.join(work.dir, "snap")
    asyncio.run(take_snapshot(src, snap))
    files = dir_digest(snap)
    r = run_cli(["-accel", "test", *bad_args, "-incoming", f"file:{snap}"])
    assert r.returncode == 1
    assert why in one_line(r.stderr)
    assert dir_digest(snap) == files


# ---------------------------------------------------------------------------------------------
# Corrupt, truncated and foreign snapshot files
# ---------------------------------------------------------------------------------------------

_PREFIX = struct.Struct("<8sIIQ")


def _reseal(data: bytes) -> bytes:
    """Fix the total length and CRC after an edit, so only the edited field is wrong."""
    body = bytearray(data[:-4])
    body[16:24] = struct.pack("<Q", len(body) + 4)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def _first_record_offset(data: bytes) -> int:
    off = _PREFIX.size + 4  # prefix, page size
    for _ in range(2):  # arch, hypervisor kind
        (n,) = struct.unpack_from("<H", data, off)
        off += 2 + n
    (regions,) = struct.unpack_from("<I", data, off)
    off += 4 + 16 * regions
    (fp,) = struct.unpack_from("<I", data, off)
    off += 4 + fp
    return off + 4  # record count


def _edit_state(fn):
    def edit(snap: str) -> None:
        p = os.path.join(snap, "state")
        with open(p, "rb") as f:
            data = f.read()
        with open(p, "wb") as f:
            f.write(fn(data))
    return edit


def _replace_str(old: bytes, new: bytes):
    assert len(old) == len(new)
    return _edit_state(lambda d: _reseal(d.replace(struct.pack("<H", len(old)) + old,
                                                   struct.pack("<H", len(new)) + new, 1)))


def _oversized_record(d: bytes) -> bytes:
    off = _first_record_offset(d)
    (n,) = struct.unpack_from("<H", d, off)
    size_at = off + 2 + n + 4
    return _reseal(d[:size_at] + struct.pack("<I", (16 << 20) + 1) + d[size_at + 4:])


def _truncate(name: str, keep):
    def edit(snap: str) -> None:
        p = os.path.join(snap, name)
        os.truncate(p, keep(os.path.getsize(p)))
    return edit


def _remove(name: str):
    return lambda snap: os.unlink(os.path.join(snap, name))


def _make_dir(name: str):
    def edit(snap: str) -> None:
        os.unlink(os.path.join(snap, name))
        os.mkdir(os.path.join(snap, name))
    return edit


def _flip_byte(d: bytes) -> bytes:
    i = len(d) // 2
    return d[:i] + bytes([d[i] ^ 0x40]) + d[i + 1:]


def _sparse_state(snap: str) -> None:
    p = os.path.join(snap, "state")
    with open(p, "r+b") as f:
        f.truncate(65 << 20)


CORRUPTIONS = {
    "state-truncated-half": (_truncate("state", lambda n: n // 2), "truncated"),
    "state-truncated-prefix": (_truncate("state", lambda n: 10), "truncated"),
    "state-empty": (_truncate("state", lambda n: 0), "truncated"),
    "state-bit-flip": (_edit_state(_flip_byte), "checksum mismatch"),
    "state-trailing-garbage": (_edit_state(lambda d: d + b"junk"), "trailing data"),
    "state-foreign-qemu-stream": (_edit_state(lambda d: b"QEVM\x00\x00\x00\x03" + os.urandom(4096)), "bad magic"),
    "state-foreign-elf": (_edit_state(lambda d: b"\x7fELF\x02\x01\x01" + bytes(200)), "bad magic"),
    "state-wrong-version": (_edit_state(lambda d: _reseal(d[:8] + struct.pack("<I", 99) + d[12:])),
                            "unsupported snapshot format version 99"),
    "state-wrong-arch": (_replace_str(b"x86_64", b"arm_64"), "architecture 'arm_64'"),
    "state-wrong-hypervisor": (_replace_str(b"test", b"tcg0"), "hypervisor 'tcg0'"),
    "state-oversized-record": (_edit_state(_oversized_record), "claims 16777217 bytes"),
    "state-oversized-file": (_sparse_state, "at most 67108864"),
    "state-missing": (_remove("state"), "No such file"),
    "state-is-a-directory": (_make_dir("state"), "state is not a regular file"),
    "memory-truncated": (_truncate("memory", lambda n: n - 4096), "has 268431360 bytes"),
    "memory-missing": (_remove("memory"), "No such file"),
    "memory-is-a-directory": (_make_dir("memory"), "memory is not a regular file"),
}


@pytest.fixture(scope="module")
def pristine_snapshot():
    d = tempfile.mkdtemp(prefix="pst-tpl-", dir=SCRATCH)
    vmm = Vmm(d, "src", MICROVM)
    try:
        want = asyncio.run(take_snapshot(vmm, os.path.join(d, "snap"), [(2000, 4)]))
    finally:
        vmm.kill()
    yield os.path.join(d, "snap"), want
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_snapshot_refused_with_one_line(work, pristine_snapshot, case):
    template, _ = pristine_snapshot
    edit, why = CORRUPTIONS[case]
    snap = os.path.join(work.dir, "snap")
    copy_snapshot(template, snap)
    edit(snap)
    before = {n: os.stat(os.path.join(snap, n)).st_mtime_ns for n in os.listdir(snap)}
    files = dir_digest(snap)
    r = run_cli(["-accel", "test", *MICROVM, "-incoming", f"file:{snap}",
                 "-qmp", f"unix:{work.dir}/q.sock,server,nowait"])
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert why in line, line
    assert dir_digest(snap) == files
    assert {n: os.stat(os.path.join(snap, n)).st_mtime_ns for n in os.listdir(snap)} == before
    assert not os.path.exists(f"{work.dir}/q.sock")  # refused before serving anything


def test_pristine_copy_of_the_template_restores(work, pristine_snapshot):
    """The corruption cases start from a copy that, untouched, restores fine."""
    template, want = pristine_snapshot
    snap = os.path.join(work.dir, "snap")
    copy_snapshot(template, snap)
    assert_runs_with(work("vm", [*MICROVM, "-incoming", f"file:{snap}"]), want)


# ---------------------------------------------------------------------------------------------
# A migration stream cut at random points
# ---------------------------------------------------------------------------------------------

SMALL = ["-machine", "microvm", "-smp", "2", "-m", "128"]
SMALL_TOUCH = [(1500, 11)]


def test_stream_cut_at_random_points_fails_and_source_survives(work):
    # How long is the whole stream? Migrate an identical VM through a proxy that cuts nothing.
    # The idle guest writes nothing on its own, so the length is the same for the same memory
    # (give or take a few bytes of vCPU state).
    probe_src = work("probe", SMALL)
    port = free_port()
    probe_dst = work("probe-dst", [*SMALL, "-incoming", f"tcp:127.0.0.1:{port}"])

    async def probe():
        async with qmp_session(probe_src) as q:
            await touch_all(q, SMALL_TOUCH)
            proxy = StreamProxy.tcp(("127.0.0.1", port))
            proxy.start()
            assert await q.execute("migrate", {"uri": proxy.uri}) == {}
            await until_source_exits(q)
        await asyncio.to_thread(proxy.join, 60)
        return proxy.forwarded

    total = asyncio.run(probe())
    assert probe_src.wait(30) == 0
    probe_dst.kill()
    assert total > 1500 * 4096 // 2

    src = work("src", SMALL)
    rng = random.Random(20240601)
    # From nothing at all to a few bytes short of the end (inside the last state records).
    cuts = sorted({0, 1, 20, 100, total // 2, total - 32, *(rng.randrange(total - 32) for _ in range(6))})

    async def cut_all():
        async with qmp_session(src) as q:
            await touch_all(q, SMALL_TOUCH)
            before = await digest(q)
            for i, n in enumerate(cuts):
                port = free_port()
                dst = work(f"dst{i}", [*SMALL, "-incoming", f"tcp:127.0.0.1:{port}"])
                proxy = StreamProxy.tcp(("127.0.0.1", port), limit=n)
                proxy.start()
                assert await q.execute("migrate", {"uri": proxy.uri}) == {}
                info = await wait_status(q)
                assert info["status"] == "failed", (n, info)
                assert info["error-desc"], info
                assert await q.execute("query-status") == STATUS_RUNNING, n
                assert await digest(q) == before, n
                assert await wait_exit(dst) == 1, (n, dst.log())
                await asyncio.to_thread(proxy.join, 30)
                assert proxy.forwarded == n and proxy.cut
            # Still intact: the same source now migrates in full.
            port = free_port()
            dst = work("final", [*SMALL, "-incoming", f"tcp:127.0.0.1:{port}"])
            assert await q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}", "verify": True}) == {}
            await until_source_exits(q)
        async with qmp_session(dst) as q:
            assert await q.execute("query-status") == STATUS_RUNNING
            assert await digest(q) == before

    asyncio.run(cut_all())
    assert src.wait(30) == 0
