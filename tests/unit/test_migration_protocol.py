"""The migration wire protocol: round trips, incremental decoding over any chunking, refusals."""

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from domain.config import MachineConfig, MemoryConfig, VmConfig
from domain.errors import SnapshotFormatError
from domain.memory import PAGE_SIZE
from domain.migration import config_fingerprint
from domain import migration_protocol as p

FP = config_fingerprint(VmConfig(machine=MachineConfig(type="q35"), memory=MemoryConfig(size=1 << 20)), "test")
DATA = os.urandom(3 * PAGE_SIZE)

MESSAGES = [
    p.Hello("test", ((0, 1 << 20),), FP),
    p.Accept(),
    p.Reject("memory size differs: source 1, destination 2"),
    p.Pages((p.PageRun(0, 2, False, DATA[: 2 * PAGE_SIZE]), p.PageRun(2 * PAGE_SIZE, 100, True),
             p.PageRun(1 << 20, 1, False, DATA[2 * PAGE_SIZE:]))),
    p.IterationEnd(7),
    p.StateRecord("vcpu.0", 2, b"regs" * 100),
    p.Complete(run=True, digest=bytes(range(32))),
    p.Complete(run=False),
    p.Ack(),
    p.Cancel(),
    p.Error("disk on fire"),
]


def _same(a, b) -> bool:
    if isinstance(a, p.Pages):
        return a.runs == b.runs and all(
            (x.data is None and y.data is None) or bytes(x.data) == bytes(y.data)
            for x, y in zip(a.runs, b.runs))
    return a == b


def _stream() -> bytes:
    return b"".join(p.encode(m) for m in MESSAGES)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    raw = p.encode(msg)
    msg_type, length = p.decode_frame_header(raw[: p.FRAME_HEADER_SIZE])
    assert length == len(raw) - p.FRAME_HEADER_SIZE
    assert _same(p.decode_payload(msg_type, raw[p.FRAME_HEADER_SIZE:]), msg)


def test_stream_decoder_whole_stream():
    got = p.StreamDecoder().feed(_stream())
    assert len(got) == len(MESSAGES) and all(_same(a, b) for a, b in zip(got, MESSAGES))


def test_stream_decoder_byte_by_byte():
    dec = p.StreamDecoder()
    got = []
    for b in _stream():
        got += dec.feed(bytes([b]))
    assert len(got) == len(MESSAGES) and all(_same(a, b) for a, b in zip(got, MESSAGES))
    assert dec.buffered() == 0


@settings(max_examples=200)
@given(st.lists(st.integers(1, 5000), max_size=40))
def test_stream_decoder_any_chunking(cuts):
    raw = _stream()
    dec = p.StreamDecoder()
    got, pos = [], 0
    for n in cuts:
        got += dec.feed(raw[pos:pos + n])
        pos += n
    got += dec.feed(raw[pos:])
    assert len(got) == len(MESSAGES) and all(_same(a, b) for a, b in zip(got, MESSAGES))


def test_decoded_page_data_survives_later_feeds():
    dec = p.StreamDecoder()
    raw = p.encode(MESSAGES[3])
    (msg,) = dec.feed(raw)
    dec.feed(b"\xff" * 3)
    assert bytes(msg.runs[0].data) == DATA[: 2 * PAGE_SIZE]


def test_pages_header_then_raw_data_is_a_pages_message():
    hdr = p.pages_header([(0, 1, False), (PAGE_SIZE, 3, True)])
    (msg,) = p.StreamDecoder().feed(hdr + DATA[:PAGE_SIZE])
    assert msg.runs == (p.PageRun(0, 1), p.PageRun(PAGE_SIZE, 3, True))


def test_unknown_type_refused():
    with pytest.raises(SnapshotFormatError, match="unknown message type 99"):
        p.StreamDecoder().feed(struct.pack("<BI", 99, 0))


@pytest.mark.parametrize("msg_type", [p.HELLO, p.PAGES, p.STATE, p.REJECT, p.ACCEPT, p.COMPLETE])
def test_length_over_type_cap_refused_before_reading(msg_type):
    dec = p.StreamDecoder()
    with pytest.raises(SnapshotFormatError, match="at most"):
        dec.feed(struct.pack("<BI", msg_type, 0xFFFFFFFF))


def test_pages_run_count_over_cap_refused():
    with pytest.raises(SnapshotFormatError, match="page runs"):
        p.pages_table_size(struct.pack("<I", p.MAX_RUNS + 1))


def test_pages_length_mismatch_refused():
    hdr = bytearray(p.pages_header([(0, 1, False)]))
    payload = bytes(hdr[5:]) + DATA[:PAGE_SIZE] + b"x"
    with pytest.raises(SnapshotFormatError, match="does not match"):
        p.decode_payload(p.PAGES, payload)


def test_unaligned_or_empty_page_runs_refused():
    for gpa, n in [(1, 1), (0, 0)]:
        table = struct.pack("<I", 1) + struct.pack("<QIB", gpa, n, p.FLAG_ZERO)
        with pytest.raises(SnapshotFormatError, match="invalid page run"):
            p.decode_payload(p.PAGES, table)


def test_unknown_page_flags_refused():
    table = struct.pack("<I", 1) + struct.pack("<QIB", 0, 1, 0x80)
    with pytest.raises(SnapshotFormatError, match="flags"):
        p.decode_payload(p.PAGES, table)


def test_hello_from_another_protocol_version_refused():
    raw = bytearray(p.encode(MESSAGES[0]))
    struct.pack_into("<I", raw, 5, 9)
    with pytest.raises(SnapshotFormatError, match="protocol version 9"):
        p.StreamDecoder().feed(bytes(raw))


def test_complete_with_bad_digest_length_refused():
    with pytest.raises(SnapshotFormatError, match="digest"):
        p.decode_payload(p.COMPLETE, bytes([1, 5]) + bytes(5))


def test_trailing_bytes_in_fixed_messages_refused():
    with pytest.raises(SnapshotFormatError, match="trailing"):
        p.decode_payload(p.ITERATION_END, bytes(5))


def test_encoder_caps():
    with pytest.raises(ValueError):
        p.pages_header([(0, 1, True)] * (p.MAX_RUNS + 1))
    with pytest.raises(ValueError):
        p.pages_header([(0, p.MAX_PAGES_DATA // PAGE_SIZE + 1, False)])
    long = p.encode(p.Error("x" * 10000))
    assert len(long) == p.FRAME_HEADER_SIZE + p.MAX_REASON


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_format_errors(blob):
    try:
        p.StreamDecoder().feed(blob)
    except SnapshotFormatError:
        pass


@settings(max_examples=300)
@given(st.integers(1, 10), st.binary(min_size=0, max_size=300))
def test_random_payloads_of_each_type_raise_only_format_errors(msg_type, payload):
    try:
        p.decode_payload(msg_type, payload)
    except SnapshotFormatError:
        pass


@settings(max_examples=300)
@given(st.data())
def test_mutated_streams_raise_only_format_errors(data):
    raw = bytearray(_stream())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        p.StreamDecoder().feed(bytes(raw))
    except SnapshotFormatError:
        pass
