"""The live-migration wire protocol: pure encode/decode of length-prefixed, typed frames.

    frame   = u8 type | u32 payload length | payload          (little-endian)

    source -> destination                    destination -> source
    HELLO    version, page size, arch,       ACCEPT
             kind, layout, fingerprint       REJECT  reason
    PAGES    runs + page data                ACK     (after COMPLETE, state applied)
    ITERATION_END round                      ERROR   reason
    STATE    one state record (as in the snapshot file)
    COMPLETE flags (run), optional SHA-256 of guest memory
    CANCEL   / ERROR reason

PAGES payload: u32 run count | runs (u64 gpa, u32 pages, u8 flags) | data of the non-zero runs,
in run order. A zero run (flag ZERO) carries no data. The table comes first so the receiver can
read the page data straight into guest memory. Every length is capped per type before anything
is allocated; garbage raises SnapshotFormatError.
"""

from __future__ import annotations

import struct
from typing import Union

from domain.errors import SnapshotFormatError
from domain.memory import PAGE_SIZE
from domain.migration import ConfigFingerprint
from domain.record import field, record
from domain.snapshot_format import (
    ARCH,
    MAX_FINGERPRINT,
    MAX_NAME,
    MAX_RECORD_SIZE,
    MAX_SHORT_STR,
    ByteReader,
    Layout,
    decode_layout,
    decode_record,
    encode_layout,
    encode_record,
    put_string,
    validate_layout,
)

PROTOCOL_VERSION = 1

HELLO = 1
ACCEPT = 2
REJECT = 3
PAGES = 4
ITERATION_END = 5
STATE = 6
COMPLETE = 7
ACK = 8
CANCEL = 9
ERROR = 10

TYPE_NAMES = {
    HELLO: "HELLO", ACCEPT: "ACCEPT", REJECT: "REJECT", PAGES: "PAGES",
    ITERATION_END: "ITERATION_END", STATE: "STATE", COMPLETE: "COMPLETE", ACK: "ACK",
    CANCEL: "CANCEL", ERROR: "ERROR",
}

FLAG_ZERO = 1
COMPLETE_RUN = 1  # the destination starts its vCPUs (the source was running)

MAX_RUNS = 8192
MAX_PAGES_DATA = 8 << 20
MAX_REASON = 4096
DIGEST_SIZE = 32

_FRAME = struct.Struct("<BI")
FRAME_HEADER_SIZE = _FRAME.size
_U32 = struct.Struct("<I")
_RUN = struct.Struct("<QIB")
RUN_SIZE = _RUN.size

_MAX_PAYLOAD = {
    HELLO: 8 + 2 * (2 + MAX_SHORT_STR) + 4 + 64 * 16 + 4 + MAX_FINGERPRINT,
    ACCEPT: 0,
    REJECT: MAX_REASON,
    PAGES: 4 + MAX_RUNS * RUN_SIZE + MAX_PAGES_DATA,
    ITERATION_END: 4,
    STATE: 2 + MAX_NAME + 8 + MAX_RECORD_SIZE,
    COMPLETE: 2 + DIGEST_SIZE,
    ACK: 0,
    CANCEL: 0,
    ERROR: MAX_REASON,
}


@record(frozen=True)
class Hello:
    hypervisor_kind: str
    layout: Layout
    fingerprint: ConfigFingerprint
    arch: str = ARCH
    page_size: int = PAGE_SIZE
    version: int = PROTOCOL_VERSION


@record(frozen=True)
class Accept:
    pass


@record(frozen=True)
class Reject:
    reason: str


@record(frozen=True)
class PageRun:
    gpa: int
    npages: int
    zero: bool = False
    data: bytes | memoryview | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return 0 if self.zero else self.npages * PAGE_SIZE


@record(frozen=True)
class Pages:
    runs: tuple[PageRun, ...]


@record(frozen=True)
class IterationEnd:
    round: int


@record(frozen=True)
class StateRecord:
    name: str
    version: int
    payload: bytes


@record(frozen=True)
class Complete:
    run: bool = True
    digest: bytes | None = None


@record(frozen=True)
class Ack:
    pass


@record(frozen=True)
class Cancel:
    pass


@record(frozen=True)
class Error:
    reason: str


Message = Union[Hello, Accept, Reject, Pages, IterationEnd, StateRecord, Complete, Ack, Cancel, Error]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def frame(msg_type: int, payload=b"") -> bytes:
    payload = bytes(payload)
    if len(payload) > _MAX_PAYLOAD[msg_type]:
        raise ValueError(f"{TYPE_NAMES[msg_type]} payload of {len(payload)} bytes exceeds its cap")
    return _FRAME.pack(msg_type, len(payload)) + payload


def _reason(text: str) -> bytes:
    b = text.encode("utf-8")[:MAX_REASON]
    return b.decode("utf-8", errors="ignore").encode("utf-8")


def pages_header(runs: list[tuple[int, int, bool]]) -> bytes:
    """Frame header and run table of a PAGES message whose data (the non-zero runs' pages, in
    order) the sender writes right after it, straight from guest memory."""
    if len(runs) > MAX_RUNS:
        raise ValueError(f"{len(runs)} page runs in one message (at most {MAX_RUNS})")
    data = 0
    table = bytearray(_U32.pack(len(runs)))
    for gpa, npages, zero in runs:
        table += _RUN.pack(gpa, npages, FLAG_ZERO if zero else 0)
        if not zero:
            data += npages * PAGE_SIZE
    if data > MAX_PAGES_DATA:
        raise ValueError(f"{data} bytes of page data in one message (at most {MAX_PAGES_DATA})")
    return _FRAME.pack(PAGES, len(table) + data) + bytes(table)


def encode(msg: Message) -> bytes:
    if isinstance(msg, Hello):
        p = bytearray(_U32.pack(msg.version) + _U32.pack(msg.page_size))
        put_string(p, msg.arch)
        put_string(p, msg.hypervisor_kind)
        encode_layout(p, validate_layout(msg.layout))
        fp = msg.fingerprint.to_bytes()
        p += _U32.pack(len(fp)) + fp
        return frame(HELLO, p)
    if isinstance(msg, Accept):
        return frame(ACCEPT)
    if isinstance(msg, Reject):
        return frame(REJECT, _reason(msg.reason))
    if isinstance(msg, Pages):
        hdr = pages_header([(r.gpa, r.npages, r.zero) for r in msg.runs])
        return hdr + b"".join(bytes(r.data) for r in msg.runs if not r.zero)
    if isinstance(msg, IterationEnd):
        return frame(ITERATION_END, _U32.pack(msg.round))
    if isinstance(msg, StateRecord):
        p = bytearray()
        encode_record(p, msg.name, msg.version, msg.payload)
        return frame(STATE, p)
    if isinstance(msg, Complete):
        digest = msg.digest or b""
        if len(digest) not in (0, DIGEST_SIZE):
            raise ValueError("digest must be 32 bytes (SHA-256)")
        return frame(COMPLETE, bytes([COMPLETE_RUN if msg.run else 0, len(digest)]) + digest)
    if isinstance(msg, Ack):
        return frame(ACK)
    if isinstance(msg, Cancel):
        return frame(CANCEL)
    if isinstance(msg, Error):
        return frame(ERROR, _reason(msg.reason))
    raise TypeError(f"not a migration message: {msg!r}")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

_WHAT = "migration stream"


def decode_frame_header(hdr) -> tuple[int, int]:
    """(type, payload length) of a 5-byte frame header; unknown types and lengths over the
    type's cap are refused before the payload is read."""
    if len(hdr) != FRAME_HEADER_SIZE:
        raise SnapshotFormatError(f"{_WHAT} is truncated (frame header)")
    msg_type, length = _FRAME.unpack(hdr)
    cap = _MAX_PAYLOAD.get(msg_type)
    if cap is None:
        raise SnapshotFormatError(f"{_WHAT}: unknown message type {msg_type}")
    if length > cap:
        raise SnapshotFormatError(
            f"{_WHAT}: {TYPE_NAMES[msg_type]} message of {length} bytes (at most {cap})")
    return msg_type, length


def pages_table_size(count_bytes) -> int:
    """Size of the run table that follows a PAGES message's u32 run count."""
    (n,) = _U32.unpack(bytes(count_bytes))
    if n > MAX_RUNS:
        raise SnapshotFormatError(f"{_WHAT}: {n} page runs in one message (at most {MAX_RUNS})")
    return n * RUN_SIZE


def decode_pages_table(table, payload_length: int) -> list[PageRun]:
    """Runs (without data) from a PAGES payload's count + table; checks that the data that
    follows is exactly what the non-zero runs need."""
    r = ByteReader(table, _WHAT)
    n = r.u32()
    if n > MAX_RUNS:
        raise SnapshotFormatError(f"{_WHAT}: {n} page runs in one message (at most {MAX_RUNS})")
    runs, data = [], 0
    for _ in range(n):
        gpa, npages, flags = _RUN.unpack(r.take(RUN_SIZE))
        if flags & ~FLAG_ZERO:
            raise SnapshotFormatError(f"{_WHAT}: unknown page run flags {flags:#x}")
        if gpa % PAGE_SIZE or npages == 0:
            raise SnapshotFormatError(f"{_WHAT}: invalid page run {gpa:#x}+{npages} pages")
        zero = bool(flags & FLAG_ZERO)
        if not zero:
            data += npages * PAGE_SIZE
        runs.append(PageRun(gpa, npages, zero))
    r.end()
    if 4 + n * RUN_SIZE + data != payload_length:
        raise SnapshotFormatError(f"{_WHAT}: PAGES message length does not match its page runs")
    return runs


def _decode_hello(r: ByteReader) -> Hello:
    version = r.u32()
    if version != PROTOCOL_VERSION:
        raise SnapshotFormatError(
            f"unsupported migration protocol version {version} (this pystrato speaks {PROTOCOL_VERSION})")
    page_size = r.u32()
    arch = r.string(MAX_SHORT_STR, "architecture")
    kind = r.string(MAX_SHORT_STR, "hypervisor kind")
    layout = decode_layout(r, _WHAT)
    n = r.u32()
    if n > MAX_FINGERPRINT:
        raise SnapshotFormatError(f"{_WHAT}: configuration fingerprint of {n} bytes is too large")
    fp = ConfigFingerprint.from_bytes(r.take(n))
    return Hello(kind, layout, fp, arch, page_size, version)


def _text(payload) -> str:
    return bytes(payload).decode("utf-8", errors="replace")


def decode_payload(msg_type: int, payload) -> Message:
    payload = memoryview(payload).cast("B")
    r = ByteReader(payload, _WHAT)
    if msg_type == HELLO:
        msg: Message = _decode_hello(r)
    elif msg_type == ACCEPT:
        msg = Accept()
    elif msg_type == REJECT:
        return Reject(_text(payload))
    elif msg_type == PAGES:
        table_len = 4 + pages_table_size(payload[:4]) if len(payload) >= 4 else 4
        runs = decode_pages_table(payload[:table_len], len(payload))
        off, out = table_len, []
        for run in runs:
            if run.zero:
                out.append(run)
            else:
                out.append(PageRun(run.gpa, run.npages, False, payload[off : off + run.nbytes]))
                off += run.nbytes
        return Pages(tuple(out))
    elif msg_type == ITERATION_END:
        msg = IterationEnd(r.u32())
    elif msg_type == STATE:
        name, version, data = decode_record(r, _WHAT)
        msg = StateRecord(name, version, data)
    elif msg_type == COMPLETE:
        flags = r.u8()
        if flags & ~COMPLETE_RUN:
            raise SnapshotFormatError(f"{_WHAT}: unknown COMPLETE flags {flags:#x}")
        n = r.u8()
        if n not in (0, DIGEST_SIZE):
            raise SnapshotFormatError(f"{_WHAT}: COMPLETE digest of {n} bytes")
        msg = Complete(bool(flags & COMPLETE_RUN), bytes(r.take(n)) if n else None)
    elif msg_type == ACK:
        msg = Ack()
    elif msg_type == CANCEL:
        msg = Cancel()
    elif msg_type == ERROR:
        return Error(_text(payload))
    else:
        raise SnapshotFormatError(f"{_WHAT}: unknown message type {msg_type}")
    r.end()
    return msg


class StreamDecoder:
    """Incremental decoder: feed() any chunking of a byte stream, get whole messages back.
    Decoded PAGES data are copies, independent of later feeds."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._need: tuple[int, int] | None = None  # (type, length) of the frame being read

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            avail = len(self._buf) - self._pos
            if self._need is None:
                if avail < FRAME_HEADER_SIZE:
                    break
                hdr = bytes(self._buf[self._pos : self._pos + FRAME_HEADER_SIZE])
                self._need = decode_frame_header(hdr)
                self._pos += FRAME_HEADER_SIZE
                continue
            msg_type, length = self._need
            if avail < length:
                break
            payload = bytes(self._buf[self._pos : self._pos + length])
            self._pos += length
            self._need = None
            out.append(decode_payload(msg_type, payload))
        if self._pos > 1 << 20 or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        return out
