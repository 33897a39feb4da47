"""The manual's two-host live migration, with two network namespaces standing in for the hosts.

The test creates both namespaces and a veth pair between them; the addresses exist only inside
the namespaces (10.200.N.1/30 and 10.200.N.2/30), so the host's own network is not touched.
Each VMM runs under `ip netns exec`; QMP stays on unix sockets in a shared directory (path-bound
unix sockets are reachable across network namespaces), migration goes over tcp between them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.e2e.migration_kit import Toucher, Vmm, qmp_session, replay_digest, until_source_exits

pytestmark = pytest.mark.net

MACHINE = ["-machine", "q35", "-smp", "2", "-m", "256"]
PORT = 4446  # the manual's port: free inside a fresh namespace


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = f"{os.getpid() % 100000}"
    a, b = f"pst-src-{tag}", f"pst-dst-{tag}"
    subnet = os.getpid() % 250
    src_ip, dst_ip = f"10.200.{subnet}.1", f"10.200.{subnet}.2"
    created: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", f"pv{tag}a", "netns", a, "type", "veth", "peer", "name", f"pv{tag}b", "netns", b)
        for ns, dev, addr in ((a, f"pv{tag}a", src_ip), (b, f"pv{tag}b", dst_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (RuntimeError, OSError) as e:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {e}")
    yield {"src": a, "dst": b, "src_ip": src_ip, "dst_ip": dst_ip}
    for ns in created:  # deleting a namespace deletes its end of the veth pair, and the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_live_migration_between_two_network_namespaces(two_hosts):
    d = tempfile.mkdtemp(prefix="pst-ns-", dir="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    procs: list[Vmm] = []
    try:
        uri = f"tcp:{two_hosts['dst_ip']}:{PORT}"
        dst = Vmm(d, "dst", [*MACHINE, "-incoming", uri], prefix=["ip", "netns", "exec", two_hosts["dst"]])
        procs.append(dst)
        src = Vmm(d, "src", MACHINE, prefix=["ip", "netns", "exec", two_hosts["src"]])
        procs.append(src)
        pre = [(20000, 1)]
        toucher = Toucher(src, pages=200, interval=0.01)

        async def migrate():
            async with qmp_session(dst) as q:
                assert (await q.execute("query-status"))["status"] == "inmigrate"
            async with qmp_session(src) as q:
                for pages, seed in pre:
                    await q.execute("x-guest-touch", {"pages": pages, "seed": seed})
                toucher.start()
                while len(toucher.applied) < 3:
                    await asyncio.sleep(0.01)
                # The destination's address exists only in the other namespace.
                assert await q.execute("migrate", {"uri": uri, "verify": True}) == {}
                await until_source_exits(q)

        asyncio.run(migrate())
        assert src.wait(60) == 0, src.stderr()
        toucher.stop()
        assert toucher.refused is None or "not running" in toucher.refused

        async def on_destination():
            async with qmp_session(dst) as q:
                assert (await q.execute("query-status"))["status"] == "running"
                assert (await q.execute("query-migrate"))["status"] == "completed"
                got = (await q.execute("x-query-memory-digest"))["sha256"]
                await q.execute("quit")
                return got

        got = asyncio.run(on_destination())
        assert dst.wait() == 0
        assert "memory digest verified" in dst.log()
        want = {replay_digest(d, MACHINE, pre + toucher.applied)}
        if toucher.unknown is not None:
            want.add(replay_digest(d, MACHINE, pre + toucher.applied + [toucher.unknown], "reference2"))
        assert got in want
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(d, ignore_errors=True)
