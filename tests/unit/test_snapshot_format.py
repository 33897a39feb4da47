"""The snapshot state file format and the memory file helpers: round trips and every refusal."""

import os
import random
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from domain.config import MachineConfig, MemoryConfig, VmConfig
from domain.errors import SnapshotFormatError
from domain.memory import PAGE_SIZE
from domain.migration import config_fingerprint
from domain.snapshot_format import (
    MAX_RECORD_SIZE,
    MAX_RECORDS,
    MAX_STATE_FILE,
    PREFIX_SIZE,
    SnapshotHeader,
    check_state_prefix,
    decode_state_file,
    encode_state_file,
    memory_file_regions,
    memory_file_size,
    nonzero_runs,
    page_runs,
    validate_layout,
)

CFG = VmConfig(machine=MachineConfig(type="microvm"), memory=MemoryConfig(size=3 * PAGE_SIZE))
FP = config_fingerprint(CFG, "test")
LAYOUT = ((0, 2 * PAGE_SIZE), (1 << 20, PAGE_SIZE))
HEADER = SnapshotHeader("test", LAYOUT, FP)
RECORDS = {"machine": (1, b"m"), "vcpu.0": (3, bytes(range(40))), "dev.rootfs": (1, b"")}


def small_file() -> bytes:
    return encode_state_file(HEADER, RECORDS)


def reseal(data: bytes) -> bytes:
    """Recompute length and CRC so that only the structural defect under test remains."""
    body = bytearray(data[:-4])
    struct.pack_into("<Q", body, 16, len(body) + 4)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


def test_round_trip():
    header, records = decode_state_file(small_file(), expected_kind="test")
    assert header == HEADER
    assert records == RECORDS


def test_encoding_is_deterministic():
    assert small_file() == small_file()


def test_large_record_round_trip():
    payload = os.urandom(1 << 20)
    _, records = decode_state_file(encode_state_file(HEADER, {"vm": (7, payload)}))
    assert records == {"vm": (7, payload)}


def test_truncation_at_every_offset_is_refused():
    data = small_file()
    for n in range(len(data)):
        with pytest.raises(SnapshotFormatError) as ei:
            decode_state_file(data[:n])
        assert "\n" not in str(ei.value)


def test_every_flipped_byte_is_refused():
    data = small_file()
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(SnapshotFormatError):
                decode_state_file(bytes(bad))


def test_corrupt_body_names_the_checksum():
    bad = bytearray(small_file())
    bad[-10] ^= 0xFF
    with pytest.raises(SnapshotFormatError, match="checksum mismatch"):
        decode_state_file(bytes(bad))


def test_trailing_data_refused():
    with pytest.raises(SnapshotFormatError, match="trailing"):
        decode_state_file(small_file() + b"\0")


def test_truncated_file_names_the_sizes():
    data = small_file()
    with pytest.raises(SnapshotFormatError, match=f"truncated \\({len(data) - 1} of {len(data)} bytes\\)"):
        decode_state_file(data[:-1])


def test_foreign_file_is_bad_magic():
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        decode_state_file(b"QEVM\x00\x00\x00\x03" + bytes(100))
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        decode_state_file(b"\x7fELF")


def test_wrong_version_refused():
    data = bytearray(small_file())
    struct.pack_into("<I", data, 8, 2)
    with pytest.raises(SnapshotFormatError, match="unsupported snapshot format version 2"):
        decode_state_file(reseal(bytes(data)))


def test_unknown_flags_refused():
    data = bytearray(small_file())
    struct.pack_into("<I", data, 12, 1)
    with pytest.raises(SnapshotFormatError, match="flags"):
        decode_state_file(reseal(bytes(data)))


def test_wrong_arch_refused():
    header = SnapshotHeader("test", LAYOUT, FP, arch="aarch64")
    with pytest.raises(SnapshotFormatError, match="architecture 'aarch64'"):
        decode_state_file(encode_state_file(header, RECORDS))


def test_wrong_page_size_refused():
    header = SnapshotHeader("test", LAYOUT, FP, page_size=65536)
    with pytest.raises(SnapshotFormatError, match="page size 65536"):
        decode_state_file(encode_state_file(header, RECORDS))


def test_wrong_hypervisor_kind_refused():
    with pytest.raises(SnapshotFormatError, match="taken with hypervisor 'test', this VM uses 'kvm'"):
        decode_state_file(small_file(), expected_kind="kvm")


def test_claimed_total_over_cap_refused_from_the_prefix():
    prefix = bytearray(small_file()[:PREFIX_SIZE])
    struct.pack_into("<Q", prefix, 16, MAX_STATE_FILE + 1)
    with pytest.raises(SnapshotFormatError, match="at most"):
        check_state_prefix(bytes(prefix))


def _record_offset(data: bytes) -> int:
    """Offset of the first record's u16 name length (right after the u32 record count)."""
    fp = FP.to_bytes()
    return data.index(fp) + len(fp) + 4


def test_oversized_record_length_refused_before_allocating():
    data = bytearray(small_file())
    off = _record_offset(bytes(data))
    name_len = struct.unpack_from("<H", data, off)[0]
    struct.pack_into("<I", data, off + 2 + name_len + 4, MAX_RECORD_SIZE + 1)
    with pytest.raises(SnapshotFormatError, match="claims 16777217 bytes"):
        decode_state_file(reseal(bytes(data)))


def test_record_length_past_the_end_refused():
    data = bytearray(small_file())
    off = _record_offset(bytes(data))
    name_len = struct.unpack_from("<H", data, off)[0]
    struct.pack_into("<I", data, off + 2 + name_len + 4, 1000)
    with pytest.raises(SnapshotFormatError, match="truncated"):
        decode_state_file(reseal(bytes(data)))


def test_record_count_over_cap_refused():
    data = bytearray(small_file())
    struct.pack_into("<I", data, _record_offset(bytes(data)) - 4, MAX_RECORDS + 1)
    with pytest.raises(SnapshotFormatError, match="state records"):
        decode_state_file(reseal(bytes(data)))


def test_duplicate_record_refused():
    data = bytearray(small_file())
    count_off = _record_offset(bytes(data)) - 4
    # Duplicate the last record ("dev.rootfs", empty payload) and bump the count.
    last = b"\x0a\x00dev.rootfs" + struct.pack("<II", 1, 0)
    assert data[:-4].endswith(last)
    struct.pack_into("<I", data, count_off, len(RECORDS) + 1)
    forged = bytes(data[:-4]) + last + b"\0\0\0\0"
    with pytest.raises(SnapshotFormatError, match="duplicate state record 'dev.rootfs'"):
        decode_state_file(reseal(forged))


def test_bad_record_name_refused():
    data = small_file()
    forged = data.replace(b"vcpu.0", b"vcpu/0")
    with pytest.raises(SnapshotFormatError, match="invalid state record name"):
        decode_state_file(reseal(forged))


def test_bad_layouts_refused():
    for layout in [((1, PAGE_SIZE),), ((0, 100),), ((0, 0),), ((PAGE_SIZE, PAGE_SIZE), (0, PAGE_SIZE)),
                   ((0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)), (), ((0, 1 << 50),)]:
        with pytest.raises(SnapshotFormatError):
            validate_layout(layout)


def test_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ValueError):
        encode_state_file(HEADER, {"bad name": (1, b"")})
    with pytest.raises(ValueError):
        encode_state_file(HEADER, {"x": (1, bytes(MAX_RECORD_SIZE + 1))})


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_format_errors(blob):
    with pytest.raises(SnapshotFormatError):
        decode_state_file(blob)


@settings(max_examples=300)
@given(st.data())
def test_mutated_and_resealed_files_raise_only_format_errors(data):
    raw = bytearray(small_file())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(PREFIX_SIZE, len(raw) - 5))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decode_state_file(reseal(bytes(raw)))
    except SnapshotFormatError:
        pass


# --- memory file --------------------------------------------------------------------------------


def test_memory_file_regions_are_consecutive_in_layout_order():
    layout = ((0, 0xA0000), (0x100000, 0x300000), (1 << 32, 0x200000))
    assert memory_file_regions(layout) == [
        (0, 0xA0000, 0), (0x100000, 0x300000, 0xA0000), (1 << 32, 0x200000, 0x3A0000)]
    assert memory_file_size(layout) == 0x5A0000


def _naive_runs(buf: bytes) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for off in range(0, len(buf), PAGE_SIZE):
        if any(buf[off:off + PAGE_SIZE]):
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
            else:
                runs.append((off, PAGE_SIZE))
    return runs


@settings(max_examples=100)
@given(st.integers(1, 200), st.lists(st.tuples(st.integers(0, 199), st.integers(0, PAGE_SIZE - 1)), max_size=30))
def test_nonzero_runs_match_a_naive_scan(npages, writes):
    buf = bytearray(npages * PAGE_SIZE)
    for page, byte in writes:
        if page < npages:
            buf[page * PAGE_SIZE + byte] = 1 + byte % 255
    assert nonzero_runs(memoryview(buf)) == _naive_runs(bytes(buf))


def test_nonzero_runs_on_chunk_boundaries():
    buf = bytearray(1 << 20)
    rng = random.Random(5)
    for _ in range(50):
        buf[rng.randrange(len(buf))] = 0xFF
    buf[(256 << 10) - 1] = 1  # last byte of the first 256 KiB chunk
    buf[256 << 10] = 1  # first byte of the next
    assert nonzero_runs(memoryview(buf)) == _naive_runs(bytes(buf))


@settings(max_examples=100)
@given(st.lists(st.sampled_from(["zero", "first-word", "late-byte"]), min_size=1, max_size=200))
def test_nonzero_runs_whether_or_not_a_page_starts_with_zeros(kinds):
    # Pages whose first 8 bytes are set are settled by the strided first-word read, the others
    # by a full compare.
    buf = bytearray(len(kinds) * PAGE_SIZE)
    for i, kind in enumerate(kinds):
        if kind == "first-word":
            buf[i * PAGE_SIZE:i * PAGE_SIZE + 8] = b"\x01" * 8
        elif kind == "late-byte":
            buf[i * PAGE_SIZE + PAGE_SIZE - 1] = 7
    assert nonzero_runs(memoryview(buf)) == _naive_runs(bytes(buf))


def test_page_runs_coalesce():
    P = PAGE_SIZE
    assert page_runs([5 * P, 0, P, 2 * P, 5 * P, 9 * P, 6 * P]) == [(0, 3), (5 * P, 2), (9 * P, 1)]
    assert page_runs([]) == []
