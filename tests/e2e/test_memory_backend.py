"""-mem-path, mem-share, -mem-prealloc on a running VMM: guest RAM lives where the user said."""

import hashlib

from domain.memory import PAGE_SIZE

MiB = 1 << 20


def _digest(qmp) -> str:
    return qmp.execute("x-query-memory-digest")["sha256"]


def test_shared_mem_path_file_holds_guest_ram(vmm, tmp_path):
    ram = tmp_path / "guest-ram"
    p = vmm("-m", "128", "-machine", "microvm,mem-share=on", "-mem-path", str(ram), "-mem-prealloc")
    q = p.client()
    assert q.execute("x-guest-touch", {"pages": 64, "seed": 7}) == {"touched": 64}
    q.execute("stop")
    # 128 MiB is one region at guest address 0: the file is guest RAM, byte for byte.
    data = ram.read_bytes()
    assert len(data) == 128 * MiB
    assert hashlib.sha256(data).hexdigest() == _digest(q)
    assert data.count(bytes(PAGE_SIZE)) < 128 * MiB // PAGE_SIZE  # the touched pages are there
    q.execute("quit")
    assert p.wait() == 0
    assert ram.exists()  # a named file is the user's: it stays


def test_private_mem_path_leaves_the_file_alone(vmm, tmp_path):
    ram = tmp_path / "template"
    ram.write_bytes(b"T" * MiB)
    p = vmm("-m", "128", "-mem-path", str(ram))
    q = p.client()
    q.execute("x-guest-touch", {"pages": 64, "seed": 3})
    q.execute("stop")
    before = ram.read_bytes()
    assert before[:MiB] == b"T" * MiB and before[MiB:].count(0) == len(before) - MiB
    q.execute("quit")
    assert p.wait() == 0


def test_mem_path_directory_leaves_nothing_behind(vmm, tmp_path):
    d = tmp_path / "hp"
    d.mkdir()
    p = vmm("-m", "128", "-mem-path", str(d))
    q = p.client()
    q.execute("x-guest-touch", {"pages": 8})
    assert list(d.iterdir()) == []
    q.execute("quit")
    assert p.wait() == 0
