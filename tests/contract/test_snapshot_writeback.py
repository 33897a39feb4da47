"""The snapshot writer starts the disk writeback of each chunk as it goes (sync_file_range),
so the final fsync has little left to wait for; the data is the same either way."""

import os

import adapters.storage.snapshot_store as ss
from domain.memory import GuestMemory

MiB = 1 << 20


def test_each_written_chunk_is_handed_to_writeback(tmp_path, monkeypatch):
    calls = []
    real = ss._start_writeback
    monkeypatch.setattr(ss, "CHUNK", MiB)
    monkeypatch.setattr(ss, "_start_writeback", lambda fd, off, n: (calls.append((off, n)), real(fd, off, n)))
    ram = bytearray(os.urandom(3 * MiB))
    ram[MiB:2 * MiB] = bytes(MiB)  # a zero hole: neither written nor synced
    mem = GuestMemory([(0, ram)])
    ss.FileSnapshotStore().save(str(tmp_path), b"state", mem)
    assert calls == [(0, MiB), (2 * MiB, MiB)]
    assert ss._sync_file_range  # bound to the libc call on Linux, not the silent fallback
    data = (tmp_path / "memory").read_bytes()
    assert data == bytes(ram)


def test_a_store_that_is_not_durable_starts_no_writeback(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ss, "_start_writeback", lambda fd, off, n: calls.append(off))
    ss.FileSnapshotStore(durable=False).save(str(tmp_path), b"s", GuestMemory([(0, bytearray(b"\1" * MiB))]))
    assert calls == []
