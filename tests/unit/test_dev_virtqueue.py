import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.devices.virtio.mock import MockQueue
from domain.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VRING_AVAIL_F_NO_INTERRUPT,
    VirtioQueueError,
    VirtQueue,
)
from domain.memory import GuestMemory

RAM = 0x40000
QBASE = 0x1000
DATA = 0x10000
SIZE = 16


def setup(size=SIZE, max_size=SIZE, event_idx=False):
    mem = GuestMemory([(0, bytearray(RAM))])
    mq = MockQueue(mem, size, QBASE)
    q = mq.configure(VirtQueue(mem, max_size), event_idx)
    return mem, mq, q


def test_pop_direct_chain_and_add_used():
    mem, mq, q = setup()
    head = mq.add_chain([(DATA, 16, False), (DATA + 0x100, 512, True), (DATA + 0x400, 1, True)])
    chain = q.pop()
    assert chain.head == head
    assert chain.descs == [(DATA, 16, False), (DATA + 0x100, 512, True), (DATA + 0x400, 1, True)]
    assert chain.readable() == [(DATA, 16, False)]
    assert len(chain.writable()) == 2
    assert q.pop() is None
    q.add_used(head, 513)
    assert mq.take_used() == [(head, 513)]


def test_indirect_chain():
    mem, mq, q = setup()
    head = mq.add_indirect([(DATA, 16, False), (DATA + 0x100, 64, True)], table_addr=0x8000)
    chain = q.pop()
    assert chain.head == head
    assert chain.descs == [(DATA, 16, False), (DATA + 0x100, 64, True)]


def test_many_chains_wrap_the_rings():
    mem, mq, q = setup(size=4, max_size=4)
    for i in range(40):
        head = mq.add_chain([(DATA + i, 1, True)])
        chain = q.pop()
        assert chain.head == head and chain.descs == [(DATA + i, 1, True)]
        q.add_used(chain.head, 1)
    assert mq.used_idx() == 40


def test_undo_pop_gives_the_chain_back():
    _, mq, q = setup()
    head = mq.add_chain([(DATA, 8, True)])
    assert q.pop().head == head
    q.undo_pop()
    assert q.pop().head == head


def test_notification_without_event_idx_follows_no_interrupt_flag():
    _, mq, q = setup()
    mq.add_chain([(DATA, 8, True)])
    q.add_used(q.pop().head, 8)
    assert q.needs_notification()
    mq.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification()


def test_event_idx_suppression():
    mem, mq, q = setup(event_idx=True)
    for _ in range(4):
        mq.add_chain([(DATA, 8, True)])
    mq.set_used_event(2)  # interrupt me once used idx passes 2
    q.add_used(q.pop().head, 8)
    assert q.needs_notification()  # the very first signal always goes
    q.add_used(q.pop().head, 8)  # used idx 2
    assert not q.needs_notification()
    q.add_used(q.pop().head, 8)  # used idx 3: crossed used_event 2
    assert q.needs_notification()
    q.add_used(q.pop().head, 8)
    assert not q.needs_notification()
    # enable_notification publishes avail_event = next_avail and reports new work
    assert not q.enable_notification()
    assert mq.avail_event() == 4
    mq.add_chain([(DATA, 8, True)])
    assert q.enable_notification()


def test_notification_disable_without_event_idx_sets_no_notify():
    mem, mq, q = setup()
    q.disable_notification()
    assert mem.read_u16(mq.used_addr) == 1
    assert not q.enable_notification()
    assert mem.read_u16(mq.used_addr) == 0


# --- hostile driver -------------------------------------------------------------------------------

def expect_broken(q, match):
    with pytest.raises(VirtioQueueError, match=match):
        q.pop()
    assert q.broken
    with pytest.raises(VirtioQueueError, match="broken"):
        q.pop()


def test_head_beyond_queue_size():
    _, mq, q = setup()
    mq.publish(SIZE)
    expect_broken(q, "head")


def test_next_beyond_queue_size():
    _, mq, q = setup()
    mq.write_desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, SIZE + 3)
    mq.publish(0)
    expect_broken(q, "next index")


def test_descriptor_loop():
    _, mq, q = setup()
    mq.write_desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 1)
    mq.write_desc(1, DATA, 8, VIRTQ_DESC_F_NEXT, 0)
    mq.publish(0)
    expect_broken(q, "loop")


def test_self_loop():
    _, mq, q = setup()
    mq.write_desc(5, DATA, 8, VIRTQ_DESC_F_NEXT, 5)
    mq.publish(5)
    expect_broken(q, "loop")


def test_avail_index_jump():
    _, mq, q = setup()
    mq.set_avail_idx(SIZE + 1)
    expect_broken(q, "more than the queue size")


def test_avail_index_going_backwards_is_a_jump():
    _, mq, q = setup()
    mq.add_chain([(DATA, 8, True)])
    q.pop()
    mq.set_avail_idx(0)
    expect_broken(q, "more than the queue size")


@pytest.mark.parametrize("addr, length", [
    (RAM, 1), (RAM - 4, 8), (1 << 63, 16), ((1 << 64) - 8, 16), (0x80000000, 0xFFFFFFFF),
])
def test_buffer_outside_ram(addr, length):
    _, mq, q = setup()
    mq.add_chain([(addr, length, True)])
    expect_broken(q, "outside guest RAM")


def test_zero_length_buffer_anywhere_is_harmless():
    _, mq, q = setup()
    mq.add_chain([((1 << 64) - 1, 0, True)])
    assert q.pop().descs == [((1 << 64) - 1, 0, True)]


@pytest.mark.parametrize("length", [0, 8, 17, 16 * (SIZE + 1)])
def test_indirect_table_of_bad_length(length):
    _, mq, q = setup()
    mq.write_desc(0, 0x8000, length, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    expect_broken(q, "indirect table")


def test_indirect_table_outside_ram():
    _, mq, q = setup()
    mq.write_desc(0, RAM - 16, 32, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    expect_broken(q, "outside guest RAM")


def test_nested_indirect():
    mem, mq, q = setup()
    mem.write(0x8000, struct.pack("<QIHH", 0x9000, 16, VIRTQ_DESC_F_INDIRECT, 0))
    mq.write_desc(0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    expect_broken(q, "inside an indirect")


def test_indirect_with_next_flag():
    mem, mq, q = setup()
    mq.write_desc(0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    mq.publish(0)
    expect_broken(q, "NEXT")


def test_indirect_loop_and_bad_next():
    mem, mq, q = setup()
    mem.write(0x8000, struct.pack("<QIHH", DATA, 8, VIRTQ_DESC_F_NEXT, 1)
              + struct.pack("<QIHH", DATA, 8, VIRTQ_DESC_F_NEXT, 0))
    mq.write_desc(0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    expect_broken(q, "loop")
    mem, mq, q = setup()
    mem.write(0x8000, struct.pack("<QIHH", DATA, 8, VIRTQ_DESC_F_NEXT, 2))
    mq.write_desc(0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    expect_broken(q, "next index")


@pytest.mark.parametrize("field, value, match", [
    ("size", 3, "power of 2"), ("size", 0, "power of 2"), ("size", 2 * SIZE, "power of 2"),
    ("desc_addr", QBASE + 8, "misaligned"), ("avail_addr", QBASE + 1, "misaligned"),
    ("used_addr", RAM - 8, "outside guest RAM"), ("desc_addr", 1 << 60, "outside guest RAM"),
])
def test_bad_queue_configuration_is_refused_at_activation(field, value, match):
    mem = GuestMemory([(0, bytearray(RAM))])
    mq = MockQueue(mem, SIZE, QBASE)
    q = VirtQueue(mem, SIZE)
    q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready = SIZE, mq.desc_addr, mq.avail_addr, mq.used_addr, True
    setattr(q, field, value)
    with pytest.raises(VirtioQueueError, match=match):
        q.activate()
    assert not q.active
    assert q.pop() is None


def test_add_used_with_bad_head_is_refused():
    _, _, q = setup()
    with pytest.raises(VirtioQueueError):
        q.add_used(SIZE, 0)


def test_reset_releases_views_so_memory_can_be_unmapped():
    buf = bytearray(RAM)
    mem = GuestMemory([(0, buf)])
    mq = MockQueue(mem, SIZE, QBASE)
    q = mq.configure(VirtQueue(mem, SIZE))
    q.reset()
    mem.release()
    buf.append(0)  # a bytearray with live exports cannot be resized


def test_state_round_trip():
    mem, mq, q = setup(event_idx=True)
    mq.add_chain([(DATA, 8, True)])
    q.add_used(q.pop().head, 8)
    q.needs_notification()
    q2 = VirtQueue(mem, SIZE)
    q2.restore_state(q.save_state())
    q2.activate(q2.event_idx)
    assert (q2.next_avail, q2.next_used, q2.signalled_used) == (1, 1, 1)
    mq.add_chain([(DATA, 8, True)])
    assert q2.pop() is not None


def test_hostile_state_is_refused():
    from domain.errors import SnapshotFormatError

    _, _, q = setup()
    good = q.save_state()
    for bad in ({**good, "size": 1 << 20}, {**good, "next_avail": -1}, {**good, "ready": 1}, {"size": 4}):
        with pytest.raises(SnapshotFormatError):
            VirtQueue(q.mem, SIZE).restore_state(bad)


# --- fuzz ------------------------------------------------------------------------------------------

FUZZ_SIZE = 8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(desc=st.binary(min_size=16 * FUZZ_SIZE, max_size=16 * FUZZ_SIZE),
       ring=st.lists(st.integers(0, 0xFFFF), min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
       avail_idx=st.integers(0, 0xFFFF),
       indirect=st.binary(max_size=256),
       event_idx=st.booleans())
def test_fuzz_random_rings_only_raise_typed_errors(desc, ring, avail_idx, indirect, event_idx):
    mem = GuestMemory([(0, bytearray(0x4000))])
    mq = MockQueue(mem, FUZZ_SIZE, 0x100)
    mem.write(mq.desc_addr, desc)
    mem.write(0x2000, indirect)  # a plausible place for indirect tables to point at
    for i, head in enumerate(ring):
        mem.write_u16(mq.avail_addr + 4 + 2 * i, head)
    mq.set_avail_idx(avail_idx)
    q = mq.configure(VirtQueue(mem, FUZZ_SIZE), event_idx)
    before = mem.read(0, 0x4000)
    used_lo, used_hi = mq.used_addr, mq.end
    for _ in range(FUZZ_SIZE + 2):
        try:
            chain = q.pop()
        except VirtioQueueError:
            assert q.broken
            break
        if chain is None:
            break
        assert 0 <= chain.head < FUZZ_SIZE
        assert len(chain.descs) <= 2 * FUZZ_SIZE
        for addr, length, _ in chain.descs:
            assert length == 0 or mem.contains(addr, length)
        q.add_used(chain.head, sum(d[1] for d in chain.descs))
        q.needs_notification()
    after = mem.read(0, 0x4000)
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert all(used_lo <= i < used_hi for i in changed)  # the queue itself writes only the used ring
