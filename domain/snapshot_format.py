"""The snapshot state file and memory file layouts. Pure bytes in, bytes out.

State file (all integers little-endian):

    magic "PYSTRATO" | u32 format version | u32 flags (0) | u64 total length
    u32 page size | str arch | str hypervisor kind
    u32 region count | (u64 gpa, u64 size) * count
    u32 fingerprint length | fingerprint (canonical JSON, domain.migration.ConfigFingerprint)
    u32 record count | records: u16 name length, name, u32 record version, u32 length, payload
    u32 CRC32 of every byte before it

(str = u16 length + UTF-8.) Every length is checked against a cap before anything is allocated,
and every refusal is one SnapshotFormatError line. The memory file holds raw guest pages: the
regions of the layout at consecutive offsets, so it can be mapped MAP_PRIVATE region by region;
all-zero pages are holes.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Iterable, Mapping

from domain.config import MAX_MEMORY
from domain.errors import SnapshotFormatError
from domain.memory import PAGE_SIZE
from domain.migration import ConfigFingerprint
from domain.record import record

MAGIC = b"PYSTRATO"
FORMAT_VERSION = 1
ARCH = "x86_64"

MAX_STATE_FILE = 64 << 20
MAX_RECORD_SIZE = 16 << 20
MAX_RECORDS = 4096
MAX_REGIONS = 64
MAX_FINGERPRINT = 1 << 20
MAX_NAME = 128
MAX_SHORT_STR = 64

_PREFIX = struct.Struct("<8sIIQ")  # magic, version, flags, total length
PREFIX_SIZE = _PREFIX.size
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_REGION = struct.Struct("<QQ")
_RECORD_NAME = re.compile(r"[A-Za-z0-9_.:-]+")

Records = dict[str, tuple[int, bytes]]
Layout = tuple[tuple[int, int], ...]


class ByteReader:
    """Bounds-checked sequential reads over untrusted bytes; running short is 'truncated'."""

    def __init__(self, data, what: str):
        self._v = memoryview(data).cast("B")
        self._off = 0
        self._what = what

    @property
    def offset(self) -> int:
        return self._off

    def remaining(self) -> int:
        return len(self._v) - self._off

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining():
            raise SnapshotFormatError(f"{self._what} is truncated (needs {n} more bytes at offset {self._off})")
        v = self._v[self._off : self._off + n]
        self._off += n
        return v

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def string(self, cap: int, what: str) -> str:
        n = self.u16()
        if n > cap:
            raise SnapshotFormatError(f"{self._what}: {what} is too long ({n} bytes, at most {cap})")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise SnapshotFormatError(f"{self._what}: {what} is not UTF-8") from None

    def end(self) -> None:
        if self.remaining():
            raise SnapshotFormatError(f"{self._what} has {self.remaining()} unexpected trailing bytes")


def put_string(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise ValueError("string too long")
    out += _U16.pack(len(b)) + b


# ---------------------------------------------------------------------------------------------
# Memory layout
# ---------------------------------------------------------------------------------------------


def validate_layout(layout: Iterable[tuple[int, int]], what: str = "memory layout") -> Layout:
    out: list[tuple[int, int]] = []
    total = 0
    for gpa, size in layout:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise SnapshotFormatError(f"{what}: region {gpa:#x}+{size:#x} is not page aligned")
        if out and out[-1][0] + out[-1][1] > gpa:
            raise SnapshotFormatError(f"{what}: regions overlap or are out of order at {gpa:#x}")
        total += size
        if total > MAX_MEMORY or gpa + size > 1 << 52:
            raise SnapshotFormatError(f"{what}: more guest memory than this VMM supports")
        out.append((gpa, size))
    if not out:
        raise SnapshotFormatError(f"{what}: no memory regions")
    return tuple(out)


def encode_layout(out: bytearray, layout: Layout) -> None:
    out += _U32.pack(len(layout))
    for gpa, size in layout:
        out += _REGION.pack(gpa, size)


def decode_layout(r: ByteReader, what: str) -> Layout:
    n = r.u32()
    if n > MAX_REGIONS:
        raise SnapshotFormatError(f"{what}: {n} memory regions (at most {MAX_REGIONS})")
    return validate_layout((_REGION.unpack(r.take(_REGION.size)) for _ in range(n)), what)


def memory_file_size(layout: Layout) -> int:
    return sum(size for _, size in layout)


def memory_file_regions(layout: Layout) -> list[tuple[int, int, int]]:
    """(gpa, size, file offset): regions at consecutive offsets in layout order."""
    out, off = [], 0
    for gpa, size in layout:
        out.append((gpa, size, off))
        off += size
    return out


_ZERO_CHUNK_SIZE = 256 << 10
_ZERO_CHUNK = bytes(_ZERO_CHUNK_SIZE)
_ZERO_PAGE = bytes(PAGE_SIZE)


def nonzero_runs(view: memoryview, page_size: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """(offset, length) of the runs of pages of ``view`` that are not all zero.

    Measured on 256 MiB here: memoryview == bytes compares element by element (1.3 s), while
    zero_bytes.startswith(view) is one memcmp without a copy (0.054 s all-zero, 0.005 s random).
    So a 256 KiB chunk is tested at once, and only a non-zero chunk page by page; there, one
    strided read of each page's first 8 bytes (C speed) settles every page whose first word is
    not zero, and only the others are compared in full (fully written 256 MiB: 29 -> ~5 ms).
    """
    view = view.cast("B") if view.format != "B" else view
    n = len(view)
    zpage = _ZERO_PAGE if page_size == PAGE_SIZE else bytes(page_size)
    per_chunk = _ZERO_CHUNK_SIZE // page_size
    firsts = None
    if page_size % 8 == 0 and n % page_size == 0 and _ZERO_CHUNK_SIZE % page_size == 0:
        firsts = view.cast("Q")[:: page_size // 8].tolist()  # each page's first word
    runs: list[tuple[int, int]] = []
    start = -1
    for c in range(0, n, _ZERO_CHUNK_SIZE):
        words = None
        if firsts is not None:
            p = c // page_size
            words = firsts[p : p + per_chunk]
            if 0 not in words:  # no page here can be zero
                if start < 0:
                    start = c
                continue
        chunk = view[c : c + _ZERO_CHUNK_SIZE]
        if _ZERO_CHUNK.startswith(chunk):  # a shorter tail compares only its own length
            if start >= 0:
                runs.append((start, c - start))
                start = -1
            continue
        for i, o in enumerate(range(0, len(chunk), page_size)):
            if (words is None or words[i] == 0) and zpage.startswith(chunk[o : o + page_size]):
                if start >= 0:
                    runs.append((start, c + o - start))
                    start = -1
            elif start < 0:
                start = c + o
    if start >= 0:
        runs.append((start, n - start))
    return runs


def page_runs(gpas: Iterable[int], page_size: int = PAGE_SIZE) -> list[tuple[int, int]]:
    """Coalesce page addresses (any order, duplicates allowed) into (gpa, npages) runs."""
    runs: list[tuple[int, int]] = []
    for gpa in sorted(set(gpas)):
        if runs and runs[-1][0] + runs[-1][1] * page_size == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((gpa, 1))
    return runs


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def encode_record(out: bytearray, name: str, version: int, payload) -> None:
    nb = name.encode("ascii")
    if not _RECORD_NAME.fullmatch(name) or len(nb) > MAX_NAME:
        raise ValueError(f"invalid state record name {name!r}")
    payload = memoryview(payload).cast("B")
    if len(payload) > MAX_RECORD_SIZE:
        raise ValueError(f"state record {name!r} is larger than {MAX_RECORD_SIZE} bytes")
    if not 0 <= version <= 0xFFFFFFFF:
        raise ValueError(f"invalid version {version} for state record {name!r}")
    out += _U16.pack(len(nb)) + nb + _U32.pack(version) + _U32.pack(len(payload))
    out += payload


def decode_record(r: ByteReader, what: str) -> tuple[str, int, bytes]:
    n = r.u16()
    if n == 0 or n > MAX_NAME:
        raise SnapshotFormatError(f"{what}: invalid state record name length {n}")
    raw = bytes(r.take(n))
    name = raw.decode("ascii", errors="replace")
    if not _RECORD_NAME.fullmatch(name):
        raise SnapshotFormatError(f"{what}: invalid state record name {raw[:40]!r}")
    version = r.u32()
    size = r.u32()
    if size > MAX_RECORD_SIZE:
        raise SnapshotFormatError(
            f"{what}: state record '{name}' claims {size} bytes (at most {MAX_RECORD_SIZE})")
    return name, version, bytes(r.take(size))


# ---------------------------------------------------------------------------------------------
# State file
# ---------------------------------------------------------------------------------------------


@record(frozen=True)
class SnapshotHeader:
    hypervisor_kind: str
    layout: Layout
    fingerprint: ConfigFingerprint
    arch: str = ARCH
    page_size: int = PAGE_SIZE
    format_version: int = FORMAT_VERSION


def encode_state_file(header: SnapshotHeader, records: Mapping[str, tuple[int, bytes]]) -> bytes:
    layout = validate_layout(header.layout)
    if len(records) > MAX_RECORDS:
        raise ValueError(f"{len(records)} state records (at most {MAX_RECORDS})")
    body = bytearray()
    body += _U32.pack(header.page_size)
    put_string(body, header.arch)
    put_string(body, header.hypervisor_kind)
    encode_layout(body, layout)
    fp = header.fingerprint.to_bytes()
    body += _U32.pack(len(fp)) + fp
    body += _U32.pack(len(records))
    for name, (version, payload) in records.items():
        encode_record(body, name, version, payload)
    total = _PREFIX.size + len(body) + 4
    if total > MAX_STATE_FILE:
        raise ValueError(f"state file would be {total} bytes (at most {MAX_STATE_FILE})")
    out = bytearray(_PREFIX.pack(MAGIC, header.format_version, 0, total))
    out += body
    out += _U32.pack(zlib.crc32(out))
    return bytes(out)


def check_state_prefix(prefix: bytes) -> int:
    """Validate the fixed prefix (magic, version, flags, length); return the file's total length.
    Lets a reader refuse a foreign or oversized file before reading the rest."""
    if len(prefix) < _PREFIX.size:
        if MAGIC.startswith(bytes(prefix[: len(MAGIC)])):
            raise SnapshotFormatError(f"snapshot state file is truncated ({len(prefix)} bytes)")
        raise SnapshotFormatError("not a pystrato snapshot state file (bad magic)")
    magic, version, flags, total = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise SnapshotFormatError("not a pystrato snapshot state file (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotFormatError(
            f"unsupported snapshot format version {version} (this pystrato reads version {FORMAT_VERSION})")
    if flags != 0:
        raise SnapshotFormatError(f"unsupported snapshot format flags {flags:#x}")
    if total > MAX_STATE_FILE:
        raise SnapshotFormatError(f"snapshot state file claims {total} bytes (at most {MAX_STATE_FILE})")
    if total < _PREFIX.size + 4:
        raise SnapshotFormatError(f"snapshot state file claims an impossible length {total}")
    return total


def decode_state_file(data, *, expected_kind: str | None = None) -> tuple[SnapshotHeader, Records]:
    """Validate and parse a state file. ``expected_kind``: the hypervisor that will run it."""
    data = memoryview(data).cast("B")
    total = check_state_prefix(data[: _PREFIX.size])
    if len(data) < total:
        raise SnapshotFormatError(f"snapshot state file is truncated ({len(data)} of {total} bytes)")
    if len(data) > total:
        raise SnapshotFormatError(f"snapshot state file has {len(data) - total} bytes of trailing data")
    (crc,) = _U32.unpack(data[total - 4 :])
    if zlib.crc32(data[: total - 4]) != crc:
        raise SnapshotFormatError("snapshot state file checksum mismatch (the file is corrupt)")
    what = "snapshot state file"
    r = ByteReader(data[_PREFIX.size : total - 4], what)
    page_size = r.u32()
    arch = r.string(MAX_SHORT_STR, "architecture")
    kind = r.string(MAX_SHORT_STR, "hypervisor kind")
    if arch != ARCH:
        raise SnapshotFormatError(f"snapshot is for architecture '{arch}', this host runs '{ARCH}'")
    if page_size != PAGE_SIZE:
        raise SnapshotFormatError(f"snapshot page size {page_size} differs from {PAGE_SIZE}")
    if expected_kind is not None and kind != expected_kind:
        raise SnapshotFormatError(
            f"snapshot was taken with hypervisor '{kind}', this VM uses '{expected_kind}'")
    layout = decode_layout(r, what)
    fp_len = r.u32()
    if fp_len > MAX_FINGERPRINT:
        raise SnapshotFormatError(f"{what}: configuration fingerprint of {fp_len} bytes is too large")
    fingerprint = ConfigFingerprint.from_bytes(r.take(fp_len))
    count = r.u32()
    if count > MAX_RECORDS:
        raise SnapshotFormatError(f"{what}: {count} state records (at most {MAX_RECORDS})")
    records: Records = {}
    for _ in range(count):
        name, version, payload = decode_record(r, what)
        if name in records:
            raise SnapshotFormatError(f"{what}: duplicate state record '{name}'")
        records[name] = (version, payload)
    r.end()
    header = SnapshotHeader(kind, layout, fingerprint, arch, page_size, FORMAT_VERSION)
    return header, records
