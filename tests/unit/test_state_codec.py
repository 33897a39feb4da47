"""domain.state_codec: the fast encoder writes exactly the format's bytes, values round-trip,
and hostile records are refused with SnapshotFormatError only."""

from __future__ import annotations

import enum
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import state_codec
from domain.errors import SnapshotFormatError
from domain.state_codec import MAX_DEPTH, decode_state, encode_state

_LEN = struct.Struct("<I")


def reference(v) -> bytes:
    """The format, written as plainly as it is specified (the module's docstring)."""
    if v is None:
        return b"N"
    if v is True:
        return b"T"
    if v is False:
        return b"F"
    if isinstance(v, int):
        raw = int(v).to_bytes((v.bit_length() + 8) // 8 or 1, "little", signed=True)
        return b"I" + _LEN.pack(len(raw)) + raw
    if isinstance(v, (bytes, bytearray, memoryview)):
        return b"B" + _LEN.pack(len(bytes(v))) + bytes(v)
    if isinstance(v, str):
        return b"S" + _LEN.pack(len(v.encode())) + v.encode()
    if isinstance(v, (list, tuple)):
        return b"L" + _LEN.pack(len(v)) + b"".join(reference(i) for i in v)
    if isinstance(v, dict):
        return b"D" + _LEN.pack(len(v)) + b"".join(
            _LEN.pack(len(k.encode())) + k.encode() + reference(i) for k, i in v.items())
    raise TypeError(type(v).__name__)


def reference_decode(data: bytes):
    """The format read as plainly as it is specified, with the module's error messages."""

    def need(pos: int, n: int) -> None:
        if pos + n > len(data):
            raise SnapshotFormatError("state record truncated")

    def length(pos: int) -> int:
        need(pos, 4)
        return _LEN.unpack_from(data, pos)[0]

    def dec(pos: int, depth: int):
        if depth > MAX_DEPTH:
            raise SnapshotFormatError("state record nests too deeply")
        need(pos, 1)
        tag, pos = chr(data[pos]), pos + 1
        if tag in "NTF":
            return {"N": None, "T": True, "F": False}[tag], pos
        if tag in "IBS":
            n = length(pos)
            need(pos + 4, n)
            raw, pos = data[pos + 4:pos + 4 + n], pos + 4 + n
            if tag == "I":
                return int.from_bytes(raw, "little", signed=True), pos
            if tag == "B":
                return raw, pos
            try:
                return raw.decode(), pos
            except UnicodeDecodeError:
                raise SnapshotFormatError("state record has an invalid string") from None
        if tag in "LD":
            n, pos = length(pos), pos + 4
            if n > len(data) - pos:
                kind = "list" if tag == "L" else "dict"
                raise SnapshotFormatError(f"state record {kind} length exceeds the record")
            if tag == "L":
                items = []
                for _ in range(n):
                    item, pos = dec(pos, depth + 1)
                    items.append(item)
                return items, pos
            d = {}
            for _ in range(n):
                kn, pos = length(pos), pos + 4
                need(pos, kn)
                try:
                    k = data[pos:pos + kn].decode()
                except UnicodeDecodeError:
                    raise SnapshotFormatError("state record has an invalid key") from None
                d[k], pos = dec(pos + kn, depth + 1)
            return d, pos
        raise SnapshotFormatError(f"state record has an unknown tag {data[pos - 1]:#x}")

    value, pos = dec(0, 0)
    if pos != len(data):
        raise SnapshotFormatError(f"state record has {len(data) - pos} trailing bytes")
    return value


def outcome(f, *args):
    try:
        return ("value", f(*args))
    except (SnapshotFormatError, ValueError) as e:
        return (type(e).__name__, str(e))


def plain(v):
    """What decoding gives back: tuples as lists, other buffers as bytes, subclasses as base."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, (list, tuple)):
        return [plain(i) for i in v]
    return {str.__str__(k): plain(i) for k, i in v.items()}


class Colour(enum.IntEnum):
    RED = 7


class Mode(str, enum.Enum):  # str() of it is "Mode.ON"; its state is its value, "on"
    ON = "on"


leaves = (st.none() | st.booleans() | st.integers() | st.integers(-300, 300)
          | st.binary(max_size=40) | st.text(max_size=20)
          | st.builds(bytearray, st.binary(max_size=8)) | st.just(Colour.RED) | st.just(Mode.ON))
values = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=8) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=6)),
    max_leaves=60)


@settings(max_examples=400, deadline=None)
@given(values)
def test_encoding_is_the_formats_bytes_and_decodes_back(v):
    data = encode_state(v)
    assert data == reference(v)
    assert encode_state(v) == data  # the second time through the int memo
    assert decode_state(data) == plain(v)


def test_subclasses_are_encoded_as_their_base_values():
    # As before the fast paths: a (str, Enum) member as a value or a key is its string, list
    # and dict subclasses are their items.
    class L(list):
        pass

    class D(dict):
        pass

    for v in ({Mode.ON: Mode.ON}, L([1, Mode.ON]), D(a=L([Colour.RED])), (Mode.ON, {"k": L()})):
        assert encode_state(v) == reference(v)
        assert decode_state(encode_state(v)) == plain(v)


def test_bool_and_int_stay_apart_in_the_memo():
    # True == 1 and hash(True) == hash(1): a memo keyed by value must not hand one for the other.
    for v in ([1, True, 0, False], [True, 1], {"a": 1, "b": True}, (0, False)):
        assert encode_state(v) == reference(v)
        assert decode_state(encode_state(v)) == plain(v)
        assert [type(x) for x in decode_state(encode_state([True, 1]))] == [bool, int]


def test_the_int_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(state_codec, "_INT_MEMO", {})
    monkeypatch.setattr(state_codec, "_INT_MEMO_MAX", 16)
    v = list(range(1000, 1100))
    assert encode_state(v) == reference(v)
    assert len(state_codec._INT_MEMO) == 16
    assert encode_state(v) == reference(v)


def test_unencodable_values_are_refused():
    with pytest.raises(TypeError):
        encode_state({1: "key is not a str"})
    with pytest.raises(TypeError):
        encode_state([1.5])
    with pytest.raises(TypeError):
        encode_state({"x": object()})
    deep: list = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(ValueError):
        encode_state(deep)


@pytest.mark.parametrize("data, why", [
    (b"", "truncated"),
    (b"I\x04\x00\x00\x00\x01", "truncated"),
    (b"B\xff\xff\xff\xff", "truncated"),
    (b"L\xff\xff\xff\x7f", "list length"),
    (b"D\x01\x00\x00\x00\x09\x00\x00\x00ab", "truncated"),
    (b"S\x01\x00\x00\x00\xff", "invalid string"),
    (b"D\x01\x00\x00\x00\x01\x00\x00\x00\xffN", "invalid key"),
    (b"NN", "trailing"),
    (b"X", "unknown tag"),
    (b"L\x01\x00\x00\x00" * (MAX_DEPTH + 2) + b"N", "nests too deeply"),
])
def test_hostile_records_are_refused_clearly(data, why):
    with pytest.raises(SnapshotFormatError, match=why):
        decode_state(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_the_format_error(data):
    try:
        decode_state(data)
    except SnapshotFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(values, st.data())
def test_a_truncated_record_is_refused(v, data):
    encoded = encode_state(v)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(SnapshotFormatError):
        decode_state(encoded[:cut])


# Records built from the tags, so that most draws are nearly valid (random bytes rarely are).
tokens = st.sampled_from([b"N", b"T", b"F", b"I\x01\x00\x00\x00\x05", b"I\x02\x00\x00\x00\xff\x7f",
                          b"I\x09\x00\x00\x00", b"B\x02\x00\x00\x00ab", b"S\x01\x00\x00\x00\xc3",
                          b"S\x02\x00\x00\x00\xc3\xa9", b"L\x00\x00\x00\x00", b"L\x02\x00\x00\x00",
                          b"L\x03\x00\x00\x00", b"D\x01\x00\x00\x00\x01\x00\x00\x00k",
                          b"D\x01\x00\x00\x00\x01\x00\x00\x00\xff", b"\x00", b"I"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(tokens, max_size=12).map(b"".join) | st.binary(max_size=48))
def test_decoding_agrees_with_the_plain_reading_of_the_format(data):
    assert outcome(decode_state, data) == outcome(reference_decode, data)


@pytest.mark.parametrize("wrap", ["list", "dict", "both"])
@pytest.mark.parametrize("depth", range(MAX_DEPTH - 2, MAX_DEPTH + 3))
@pytest.mark.parametrize("leaf", [0, None, [], {}, "s", b"b", 2**70])
def test_what_encodes_at_the_depth_limit_decodes(wrap, depth, leaf):
    v = leaf
    for i in range(depth):
        v = [v] if wrap == "list" or (wrap == "both" and i % 2) else {"k": v}
    enc = outcome(encode_state, v)
    dec = outcome(decode_state, reference(v))
    assert dec == outcome(reference_decode, reference(v))
    # Encoding refuses exactly what decoding would refuse: no snapshot that cannot be restored.
    assert (enc[0] == "value") == (dec[0] == "value")
    if enc[0] == "value":
        assert enc[1] == reference(v) and dec[1] == plain(v)
