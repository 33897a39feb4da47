"""QMP framing: the incremental JSON stream splitter and the line encoder."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.qmp.protocol import MAX_MESSAGE_BYTES, MAX_NESTING, Frame, JsonStreamParser, encode


def frames(*chunks: bytes, eof: bool = False, **kw) -> list[Frame]:
    p = JsonStreamParser(**kw)
    out: list[Frame] = []
    for c in chunks:
        out += p.feed_all(c)
    if eof:
        out += p.finish()
    return out


def values(fs: list[Frame]) -> list:
    assert all(f.error is None for f in fs), fs
    return [f.value for f in fs]


def errors(fs: list[Frame]) -> list[str | None]:
    return [f.error for f in fs]


def test_several_objects_in_one_read_with_or_without_newlines():
    data = b'{"execute":"a"}{"execute":"b"}\n{"execute":"c"}\r\n  {"execute":"d"}'
    assert values(frames(data)) == [{"execute": x} for x in "abcd"]


def test_one_object_split_byte_by_byte():
    msg = b'{"execute": "blockdev-add", "arguments": {"file": {"filename": "/a}b{c\\"d"}}, "id": [1, {"x": "]"}]}'
    out = frames(*(msg[i:i + 1] for i in range(len(msg))))
    assert values(out) == [json.loads(msg)]


@pytest.mark.parametrize("split", range(1, 40))
def test_every_split_point_gives_the_same_frames(split):
    data = b'{"a":"\\\\"}  [1,"\\"]"] 42 true "s\\"" bad\n'
    assert frames(data[:split], data[split:]) == frames(data)


def test_escapes_inside_strings_do_not_end_the_value():
    out = frames(b'{"a":"x\\"}{"}' + b'{"b":"\\\\"}')
    assert values(out) == [{"a": 'x"}{'}, {"b": "\\"}]


def test_backslash_at_the_end_of_a_chunk_waits_for_the_escaped_byte():
    assert values(frames(b'{"a":"x\\', b'"y"}')) == [{"a": 'x"y'}]


def test_bare_words_are_reported_one_by_one_as_qemu_does():
    out = frames(b"this is not json\n")
    assert errors(out) == [f"JSON parse error, invalid keyword '{w}'" for w in ("this", "is", "not", "json")]


def test_a_word_split_across_reads_is_one_word():
    assert errors(frames(b"thi", b"s ")) == ["JSON parse error, invalid keyword 'this'"]


def test_other_junk_is_stray():
    assert errors(frames(b"@@ ")) == ["JSON parse error, stray '@@'"]


def test_extra_closing_brace_is_expecting_value():
    out = frames(b'{"execute": "query-status"}}')
    assert out == [Frame(value={"execute": "query-status"}), Frame(error="JSON parse error, expecting value")]


def test_top_level_scalars_are_values():
    assert values(frames(b'42 -1.5e3 true null "s" ')) == [42, -1500.0, True, None, "s"]


def test_a_scalar_waits_for_its_delimiter_or_eof():
    p = JsonStreamParser()
    assert p.feed_all(b"12") == []
    assert p.feed_all(b"3") == []
    assert p.finish() == [Frame(value=123)]


def test_unfinished_object_at_eof_is_dropped():
    assert frames(b'{"execute":', eof=True) == []


def test_malformed_object_is_one_error_then_parsing_goes_on():
    out = frames(b'{"execute": query}{"execute":"x"}')
    assert out[0].error is not None and out[0].error.startswith("JSON parse error, ")
    assert out[1:] == [Frame(value={"execute": "x"})]


@pytest.mark.parametrize("data, desc", [
    (b'{"a":1,"a":2}', "duplicate key"),
    (b'{"a":NaN}', "invalid keyword 'NaN'"),
    (b'{"a":1e400}', "number out of range"),
    (b'{"a":"\xff"}', "invalid UTF-8 sequence"),
    (b'{"a":"\x01"}', "invalid control character at"),
    (b'{"a":' + b"9" * 5000 + b"}", "invalid number"),
])
def test_what_qemu_rejects_is_a_parse_error(data, desc):
    (frame,) = frames(data)
    assert frame.error == f"JSON parse error, {desc}"


def test_message_at_the_limit_is_accepted_and_one_byte_more_is_not():
    def msg(size: int) -> bytes:
        head = b'{"execute":"x","id":"'
        return head + b"a" * (size - len(head) - 2) + b'"}'

    assert frames(msg(100), max_message=100)[0].value["execute"] == "x"
    assert frames(msg(101), max_message=100) == [Frame(error="JSON token size limit exceeded")]


def test_oversized_message_gives_one_error_then_resyncs_at_the_next_object():
    big = b'{"execute":"x","arguments":{"pad":"' + b"}{" * MAX_MESSAGE_BYTES + b'"}}'
    p = JsonStreamParser()
    out = []
    for i in range(0, len(big), 65536):
        out += p.feed_all(big[i:i + 65536])
        assert p.buffered <= MAX_MESSAGE_BYTES + 65536
    out += p.feed_all(b'\r\n{"execute":"query-status"}')
    assert out == [Frame(error="JSON token size limit exceeded"), Frame(value={"execute": "query-status"})]


def test_oversized_message_in_a_single_chunk():
    big = b'{"pad":"' + b"a" * (MAX_MESSAGE_BYTES + 1) + b'"}{"execute":"y"}'
    assert frames(big) == [Frame(error="JSON token size limit exceeded"), Frame(value={"execute": "y"})]


def test_memory_stays_bounded_inside_an_endless_string():
    p = JsonStreamParser(max_message=4096)
    out = p.feed_all(b'{"a":"')
    for _ in range(1000):
        out += p.feed_all(b"x" * 1000)
        assert p.buffered <= 4096 + 1000
    assert out == [Frame(error="JSON token size limit exceeded")]


def test_oversized_word_is_one_error():
    p = JsonStreamParser(max_message=100)
    out = []
    for _ in range(50):
        out += p.feed_all(b"w" * 64)
        assert p.buffered <= 100 + 64
    out += p.feed_all(b" ok ")
    assert out == [Frame(error="JSON token size limit exceeded"),
                   Frame(error="JSON parse error, invalid keyword 'ok'")]


def test_nesting_limit_gives_one_error_then_resyncs():
    deep = b"[" * (MAX_NESTING + 5) + b"]" * (MAX_NESTING + 5)
    out = frames(deep + b'{"execute":"z"}')
    assert out == [Frame(error="JSON nesting depth limit exceeded"), Frame(value={"execute": "z"})]


def test_nesting_at_the_limit_is_accepted():
    ok = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    (frame,) = frames(ok)
    assert frame.error is None


def test_error_text_quotes_a_bounded_part_of_the_token():
    (frame,) = frames(b"x" * 1000 + b" ")
    assert len(frame.error) < 200


def test_encode_is_compact_ascii_with_crlf():
    assert encode({"return": {}, "id": "é"}) == b'{"return":{},"id":"\\u00e9"}\r\n'


def test_encode_survives_a_lone_surrogate_from_the_input():
    (frame,) = frames(b'{"id":"\\ud800"}')
    assert encode(frame.value) == b'{"id":"\\ud800"}\r\n'


# --- properties ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
separators = st.sampled_from([b" ", b"\n", b"\r\n", b"\t ", b"  \n  "])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(json_values, separators), max_size=8), st.data())
def test_any_json_values_in_any_chunking_come_back(items, data):
    stream = b"".join(json.dumps(v).encode() + sep for v, sep in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert values(frames(*chunks, eof=True)) == [v for v, _ in items]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_any_bytes_parse_the_same_whatever_the_chunking(stream, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert frames(*chunks, eof=True) == frames(stream, eof=True)
