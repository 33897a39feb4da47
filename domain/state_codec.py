"""A small, strict, self-describing binary codec for component state (plain data).

Values: None, bool, int (signed, arbitrary size), bytes, str, list/tuple, dict with str keys.
Used for snapshot and migration records. Decoding is hostile-input safe: every length is
checked against what remains, nesting is capped, and any defect raises SnapshotFormatError.
"""

from __future__ import annotations

import struct

from domain.errors import SnapshotFormatError

_LEN = struct.Struct("<I")
MAX_DEPTH = 32


def encode_state(value) -> bytes:
    out = bytearray()
    _enc(value, out, 0)
    return bytes(out)


# The encodings of the ints met so far. A vCPU's record is mostly the same few hundred ints
# (CPUID leaves, MSR indices) at every save, and a migration encodes it inside the downtime:
# a lookup is several times cheaper than building the encoding again. Bounded, so a guest
# cannot grow it without limit through the values it leaves in its registers.
_INT_MEMO: dict[int, bytes] = {}
_INT_MEMO_MAX = 1 << 14


def _enc_int(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"I" + _LEN.pack(len(raw)) + raw


def _memo_int(v: int) -> bytes:
    e = _enc_int(v)
    if len(_INT_MEMO) < _INT_MEMO_MAX:
        _INT_MEMO[v] = e
    return e


def _enc(v, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("state nests too deeply")
    # Exact types first (the common case, and a bool is not taken for an int), then the
    # general rules for subclasses and the other buffer types.
    t = type(v)
    if t is int:
        out += _INT_MEMO.get(v) or _memo_int(v)
    elif t is list or t is tuple:
        if v and depth >= MAX_DEPTH:  # its items would nest too deeply, ints as much as any
            raise ValueError("state nests too deeply")
        out += b"L" + _LEN.pack(len(v))
        memo = _INT_MEMO
        for item in v:
            if type(item) is int:
                out += memo.get(item) or _memo_int(item)
            else:
                _enc(item, out, depth + 1)
    elif t is dict:
        if v and depth >= MAX_DEPTH:
            raise ValueError("state nests too deeply")
        out += b"D" + _LEN.pack(len(v))
        for k, item in v.items():
            if not isinstance(k, str):
                raise TypeError(f"state dict keys must be str, not {type(k).__name__}")
            raw = k.encode()
            out += _LEN.pack(len(raw)) + raw
            if type(item) is int:
                out += _INT_MEMO.get(item) or _memo_int(item)
            else:
                _enc(item, out, depth + 1)
    elif t is bytes:
        out += b"B" + _LEN.pack(len(v))
        out += v
    elif t is str:
        raw = v.encode()
        out += b"S" + _LEN.pack(len(raw)) + raw
    else:
        _enc_other(v, out, depth)


def _enc_other(v, out: bytearray, depth: int) -> None:
    if v is None:
        out += b"N"
    elif v is True:
        out += b"T"
    elif v is False:
        out += b"F"
    elif isinstance(v, int):
        out += _enc_int(v)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        raw = bytes(v)
        out += b"B" + _LEN.pack(len(raw)) + raw
    elif isinstance(v, str):
        raw = v.encode()
        out += b"S" + _LEN.pack(len(raw)) + raw
    elif isinstance(v, (list, tuple)):
        _enc(list(v), out, depth)  # a subclass is encoded as its items
    elif isinstance(v, dict):
        _enc(dict(v), out, depth)
    else:
        raise TypeError(f"cannot encode {type(v).__name__} in component state")


def decode_state(data: bytes):
    mv = memoryview(data)
    value, pos = _dec(mv, 0, 0, len(mv))
    if pos != len(mv):
        raise SnapshotFormatError(f"state record has {len(mv) - pos} trailing bytes")
    return value


_unpack_len = _LEN.unpack_from
_from_bytes = int.from_bytes


def _truncated() -> SnapshotFormatError:
    return SnapshotFormatError("state record truncated")


def _take_len(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise _truncated()
    return _unpack_len(mv, pos)[0], pos + 4


def _dec(mv: memoryview, pos: int, depth: int, end: int):
    """(value, position after it). Ints, the bulk of most records, are read in place, and
    inside lists without a call per item (the destination decodes inside the downtime)."""
    if depth > MAX_DEPTH:
        raise SnapshotFormatError("state record nests too deeply")
    if pos >= end:
        raise _truncated()
    tag = mv[pos]
    pos += 1
    if tag == 0x49 or tag == 0x42 or tag == 0x53:  # I B S
        if pos + 4 > end:
            raise _truncated()
        (n,) = _unpack_len(mv, pos)
        pos += 4
        if pos + n > end:
            raise _truncated()
        raw = mv[pos:pos + n]
        pos += n
        if tag == 0x49:
            return _from_bytes(raw, "little", signed=True), pos
        if tag == 0x42:
            return bytes(raw), pos
        try:
            return str(raw, "utf-8"), pos
        except UnicodeDecodeError:
            raise SnapshotFormatError("state record has an invalid string") from None
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x4C:  # L
        n, pos = _take_len(mv, pos, end)
        if n > end - pos:  # each item takes at least one byte
            raise SnapshotFormatError("state record list length exceeds the record")
        if n and depth >= MAX_DEPTH:
            raise SnapshotFormatError("state record nests too deeply")
        items = []
        append = items.append
        for _ in range(n):
            if pos + 5 <= end and mv[pos] == 0x49:
                (k,) = _unpack_len(mv, pos + 1)
                pos += 5
                if pos + k > end:
                    raise _truncated()
                append(_from_bytes(mv[pos:pos + k], "little", signed=True))
                pos += k
            else:
                item, pos = _dec(mv, pos, depth + 1, end)
                append(item)
        return items, pos
    if tag == 0x44:  # D
        n, pos = _take_len(mv, pos, end)
        if n > end - pos:
            raise SnapshotFormatError("state record dict length exceeds the record")
        d = {}
        for _ in range(n):
            kn, pos = _take_len(mv, pos, end)
            if pos + kn > end:
                raise _truncated()
            try:
                k = str(mv[pos:pos + kn], "utf-8")
            except UnicodeDecodeError:
                raise SnapshotFormatError("state record has an invalid key") from None
            pos += kn
            d[k], pos = _dec(mv, pos, depth + 1, end)
        return d, pos
    raise SnapshotFormatError(f"state record has an unknown tag {tag:#x}")
