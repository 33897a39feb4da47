"""domain.memory.bitmap_pages: a dirty bitmap (KVM_GET_DIRTY_LOG's layout) to page addresses."""

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.memory import PAGE_SIZE, bitmap_pages


def _naive(bitmap: bytes, base: int) -> list[int]:
    return [base + i * PAGE_SIZE for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def test_bits_in_words_and_in_a_short_tail():
    bitmap = bytearray(19)  # two 64-bit words and a 3-byte tail
    for page in (0, 63, 64, 100, 127, 128, 151):
        bitmap[page // 8] |= 1 << (page % 8)
    base = 0x100000
    assert bitmap_pages(bytes(bitmap), base) == [base + p * PAGE_SIZE for p in (0, 63, 64, 100, 127, 128, 151)]


def test_empty_and_all_zero_bitmaps():
    assert bitmap_pages(b"", 0) == []
    assert bitmap_pages(bytes(4096), 0) == []


@settings(max_examples=200)
@given(st.binary(max_size=300), st.integers(0, 1 << 20).map(lambda p: p * PAGE_SIZE))
def test_matches_a_bit_by_bit_scan(bitmap, base):
    assert bitmap_pages(bitmap, base) == _naive(bitmap, base)
