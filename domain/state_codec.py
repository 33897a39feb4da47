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
        out += b"L" + _LEN.pack(len(v))
        memo = _INT_MEMO
        for item in v:
            if type(item) is int:
                out += memo.get(item) or _memo_int(item)
            else:
                _enc(item, out, depth + 1)
    elif t is dict:
        out += b"D" + _LEN.pack(len(v))
        for k, item in v.items():
            if type(k) is not str:
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
        out += _enc_int(int(v))
    elif isinstance(v, (bytes, bytearray, memoryview)):
        raw = bytes(v)
        out += b"B" + _LEN.pack(len(raw)) + raw
    elif isinstance(v, str):
        raw = str(v).encode()
        out += b"S" + _LEN.pack(len(raw)) + raw
    elif isinstance(v, (list, tuple)):
        out += b"L" + _LEN.pack(len(v))
        for item in v:
            _enc(item, out, depth + 1)
    elif isinstance(v, dict):
        out += b"D" + _LEN.pack(len(v))
        for k, item in v.items():
            if not isinstance(k, str):
                raise TypeError(f"state dict keys must be str, not {type(k).__name__}")
            raw = k.encode()
            out += _LEN.pack(len(raw)) + raw
            _enc(item, out, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(v).__name__} in component state")


def decode_state(data: bytes):
    mv = memoryview(data)
    value, pos = _dec(mv, 0, 0)
    if pos != len(mv):
        raise SnapshotFormatError(f"state record has {len(mv) - pos} trailing bytes")
    return value


def _take_len(mv: memoryview, pos: int) -> tuple[int, int]:
    if pos + 4 > len(mv):
        raise SnapshotFormatError("state record truncated")
    (n,) = _LEN.unpack_from(mv, pos)
    return n, pos + 4


def _dec(mv: memoryview, pos: int, depth: int):
    if depth > MAX_DEPTH:
        raise SnapshotFormatError("state record nests too deeply")
    if pos >= len(mv):
        raise SnapshotFormatError("state record truncated")
    tag = mv[pos]
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag in (0x49, 0x42, 0x53):  # I B S
        n, pos = _take_len(mv, pos)
        if pos + n > len(mv):
            raise SnapshotFormatError("state record truncated")
        raw = bytes(mv[pos:pos + n])
        pos += n
        if tag == 0x49:
            return int.from_bytes(raw, "little", signed=True), pos
        if tag == 0x42:
            return raw, pos
        try:
            return raw.decode(), pos
        except UnicodeDecodeError:
            raise SnapshotFormatError("state record has an invalid string") from None
    if tag == 0x4C:  # L
        n, pos = _take_len(mv, pos)
        if n > len(mv) - pos:  # each item takes at least one byte
            raise SnapshotFormatError("state record list length exceeds the record")
        items = []
        for _ in range(n):
            item, pos = _dec(mv, pos, depth + 1)
            items.append(item)
        return items, pos
    if tag == 0x44:  # D
        n, pos = _take_len(mv, pos)
        if n > len(mv) - pos:
            raise SnapshotFormatError("state record dict length exceeds the record")
        d = {}
        for _ in range(n):
            kn, pos = _take_len(mv, pos)
            if pos + kn > len(mv):
                raise SnapshotFormatError("state record truncated")
            try:
                k = bytes(mv[pos:pos + kn]).decode()
            except UnicodeDecodeError:
                raise SnapshotFormatError("state record has an invalid key") from None
            pos += kn
            d[k], pos = _dec(mv, pos, depth + 1)
        return d, pos
    raise SnapshotFormatError(f"state record has an unknown tag {tag:#x}")
