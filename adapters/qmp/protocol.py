"""QMP framing: split a byte stream into top-level JSON values, and encode replies.

QEMU parses its monitor input as a stream of JSON values, not lines: ``{..}{..}`` in one read,
one object split over many reads, and newlines anywhere all work. ``JsonStreamParser`` does the
same incrementally. It tracks bracket depth and strings (with escapes) to find where a value
ends, then hands the complete text to ``json``. Bare words between values are reported one by
one as QEMU does (``this is not json`` gives four errors).

Memory stays bounded: a value longer than ``MAX_MESSAGE_BYTES`` (or nested deeper than
``MAX_NESTING``) yields one error, then the rest of that value is scanned without being kept,
and parsing resumes at the next top-level value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

from domain.record import record

MAX_MESSAGE_BYTES = 1 << 20
# QEMU allows 1024; Python's json recursion (and the reply echoing an ``id``) wants less.
MAX_NESTING = 512
_MAX_ERROR_TOKEN = 64  # how much of a bad token an error message quotes

_WS = re.compile(rb"[^ \t\r\n]")  # first non-whitespace byte
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'[\\"]')
_WORD = re.compile(rb'[^ \t\r\n{}\[\]",:]+')
_SCALAR = re.compile(rb"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)\Z")

_TOO_LONG = "JSON token size limit exceeded"
_TOO_DEEP = "JSON nesting depth limit exceeded"


@record(frozen=True)
class Frame:
    """One item of the input stream: a decoded JSON value, or the text of a parse error."""

    value: Any = None
    error: str | None = None


class _Syntax(ValueError):
    """Raised by the decoder hooks for input Python's json would accept but QEMU does not."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Syntax("duplicate key")
    return obj


def _constant(name: str) -> Any:
    raise _Syntax(f"invalid keyword '{name}'")  # NaN, Infinity, -Infinity


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Syntax("number out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)


def _parse_error(what: str) -> Frame:
    return Frame(error=f"JSON parse error, {what}")


def _quote(token: bytes) -> str:
    text = token[:_MAX_ERROR_TOKEN].decode("utf-8", "replace")
    return text + ("..." if len(token) > _MAX_ERROR_TOKEN else "")


def decode(text: bytes) -> Frame:
    """Decode one complete JSON text."""
    try:
        string = text.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_error("invalid UTF-8 sequence")
    try:
        return Frame(value=_DECODER.decode(string))
    except json.JSONDecodeError as exc:
        return _parse_error(exc.msg[:1].lower() + exc.msg[1:])
    except _Syntax as exc:
        return _parse_error(str(exc))
    except (ValueError, RecursionError):  # e.g. an integer over Python's digit limit
        return _parse_error("invalid number")


def _word_frame(word: bytes) -> Frame:
    if _SCALAR.match(word):
        return decode(word)
    if word[:1].isalpha():
        return _parse_error(f"invalid keyword '{_quote(word)}'")
    return _parse_error(f"stray '{_quote(word)}'")


class JsonStreamParser:
    """Incremental splitter. ``feed()`` bytes, then pull ``Frame``s with ``next()`` (or iterate)
    until it returns None. Pulling one frame at a time lets the caller stop reading while its
    replies are not being consumed."""

    def __init__(self, max_message: int = MAX_MESSAGE_BYTES, max_nesting: int = MAX_NESTING):
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._pos = 0  # scan position in _buf; _buf[0] is the start of the current value
        self._kind: str | None = None  # None between values, "value" (object/array/string), "word"
        self._depth = 0
        self._in_string = False
        self._discarding = False  # the current value already produced its error: drop it

    @property
    def buffered(self) -> int:
        """Bytes held in memory (bounded by about max_message plus one fed chunk)."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next()) is not None:
            yield frame

    def feed_all(self, data: bytes) -> list[Frame]:
        self.feed(data)
        return list(self)

    def finish(self) -> list[Frame]:
        """End of input: a pending bare word is complete; an unfinished value is dropped."""
        frames = list(self)
        if self._kind == "word" and not self._discarding and self._buf:
            frames.append(_word_frame(bytes(self._buf)))
        self._reset()
        self._buf.clear()
        return frames

    # ------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._kind = None
        self._depth = 0
        self._in_string = False
        self._discarding = False
        self._pos = 0

    def next(self) -> Frame | None:
        while True:
            if self._kind is None:
                m = _WS.search(self._buf)
                if m is None:
                    self._buf.clear()
                    return None
                del self._buf[: m.start()]
                first = self._buf[0]
                if first in b"{[":
                    self._kind, self._depth, self._pos = "value", 1, 1
                elif first == 0x22:  # a top-level string: a value of depth 0
                    self._kind, self._depth, self._in_string, self._pos = "value", 0, True, 1
                elif first in b"}],:":
                    del self._buf[:1]
                    return _parse_error("expecting value")
                else:
                    self._kind, self._pos = "word", 0
            frame = self._scan_word() if self._kind == "word" else self._scan_value()
            if frame is not None:
                return frame
            if self._kind is not None:  # incomplete: wait for more input
                return None

    def _scan_word(self) -> Frame | None:
        m = _WORD.match(self._buf, self._pos)
        end = m.end() if m else self._pos
        if end == len(self._buf):  # the word may go on in the next chunk
            self._pos = end
            return self._overflow()
        word = bytes(self._buf[:end])
        del self._buf[:end]
        discarding = self._discarding
        self._reset()
        if discarding or end > self.max_message:
            return None if discarding else Frame(error=_TOO_LONG)
        return _word_frame(word)

    def _scan_value(self) -> Frame | None:
        buf = self._buf
        pos = self._pos
        while True:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                i = m.start()
                if buf[i] == 0x5C:  # backslash: skip the escaped byte, which may be next chunk's
                    if i + 1 >= len(buf):
                        pos = i
                        break
                    pos = i + 2
                    continue
                self._in_string = False
                pos = i + 1
                if self._depth == 0:
                    return self._complete(pos)
                continue
            m = _STRUCTURAL.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            i = m.start()
            pos = i + 1
            c = buf[i]
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_nesting and not self._discarding:
                    self._discarding = True
                    self._pos = pos
                    return Frame(error=_TOO_DEEP)
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._complete(pos)
        self._pos = pos
        return self._overflow()

    def _complete(self, end: int) -> Frame | None:
        text = bytes(self._buf[:end])
        del self._buf[:end]
        discarding = self._discarding
        self._reset()
        if discarding:
            return None
        if end > self.max_message:
            return Frame(error=_TOO_LONG)
        return decode(text)

    def _overflow(self) -> Frame | None:
        """Called while a value is incomplete: once it is too long, report it and stop keeping it."""
        if self._discarding:
            del self._buf[: self._pos]
            self._pos = 0
            return None
        if self._pos > self.max_message:
            self._discarding = True
            return self._overflow() or Frame(error=_TOO_LONG)
        return None


def encode(obj: Any) -> bytes:
    """One output line as StratoVirt writes it: compact JSON, CRLF. Non-ASCII is escaped (QEMU
    does the same), which also keeps lone surrogates from an echoed ``id`` encodable."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\r\n"
