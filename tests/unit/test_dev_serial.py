import pytest

from domain.devices import serial as s
from domain.devices.serial import Serial
from domain.errors import SnapshotFormatError


class Uart:
    def __init__(self):
        self.out = bytearray()
        self.irqs = 0
        self.dev = Serial(self.out.extend, self.trigger)

    def trigger(self):
        self.irqs += 1

    def r(self, off):
        buf = bytearray(1)
        self.dev.read(off, memoryview(buf))
        return buf[0]

    def w(self, off, v):
        self.dev.write(off, memoryview(bytes([v])))


def test_reset_values():
    u = Uart()
    assert u.r(s.IER) == 0
    assert u.r(s.IIR) == s.IIR_NONE
    assert u.r(s.LCR) == 0x03
    assert u.r(s.MCR) == s.MCR_OUT2
    assert u.r(s.LSR) == s.LSR_THRE | s.LSR_TEMT
    assert u.r(s.MSR) == s.MSR_DCD | s.MSR_DSR | s.MSR_CTS


def test_output_goes_to_the_writer():
    u = Uart()
    for ch in b"hi\n":
        u.w(s.DATA, ch)
    assert bytes(u.out) == b"hi\n"
    assert u.irqs == 0  # THRE interrupt not enabled


def test_divisor_latch():
    u = Uart()
    u.w(s.LCR, 0x83)
    u.w(s.DATA, 0x01)
    u.w(s.IER, 0x02)
    assert (u.r(s.DATA), u.r(s.IER)) == (1, 2)
    u.w(s.LCR, 0x03)
    assert u.r(s.IER) == 0  # the real IER was untouched
    assert bytes(u.out) == b""


def test_scratch_register():
    u = Uart()
    u.w(s.SCR, 0x5A)
    assert u.r(s.SCR) == 0x5A


def test_thre_interrupt_when_enabled_and_after_each_byte():
    u = Uart()
    u.w(s.IER, s.IER_THRE)
    assert u.irqs == 1  # enabling THRE with an empty THR interrupts at once (Linux relies on it)
    assert u.r(s.IIR) == s.IIR_THRE
    assert u.r(s.IIR) == s.IIR_NONE  # reading IIR acknowledged it
    u.w(s.DATA, ord("x"))
    assert u.irqs == 2
    assert u.r(s.IIR) == s.IIR_THRE
    # Linux's UART_BUG_THRE probe: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
    u.w(s.IER, 0)
    u.w(s.IER, s.IER_THRE)
    assert u.r(s.IIR) & s.IIR_NONE == 0


def test_rx_data_interrupt_and_read():
    u = Uart()
    u.w(s.IER, s.IER_RDA)
    assert u.dev.enqueue_input(b"ab") == 2
    assert u.irqs == 1
    assert u.r(s.LSR) & s.LSR_DR
    assert u.r(s.IIR) == s.IIR_RDA
    assert u.r(s.DATA) == ord("a")
    assert u.r(s.IIR) == s.IIR_RDA
    assert u.r(s.DATA) == ord("b")
    assert not u.r(s.LSR) & s.LSR_DR
    assert u.r(s.IIR) == s.IIR_NONE
    u.dev.enqueue_input(b"c")
    assert u.irqs == 2  # a new edge after the line went idle


def test_rx_has_priority_over_thre():
    u = Uart()
    u.w(s.IER, s.IER_RDA | s.IER_THRE)
    u.dev.enqueue_input(b"z")
    assert u.r(s.IIR) == s.IIR_RDA
    u.r(s.DATA)
    assert u.r(s.IIR) == s.IIR_THRE


def test_fifo_is_capped_and_overflow_counted():
    u = Uart()
    assert u.dev.enqueue_input(bytes(100)) == s.FIFO_SIZE
    assert u.dev.dropped_input == 100 - s.FIFO_SIZE
    assert u.dev.fifo_free() == 0
    assert u.dev.enqueue_input(b"x") == 0
    assert u.dev.dropped_input == 100 - s.FIFO_SIZE + 1
    assert u.r(s.LSR) & s.LSR_OE
    assert not u.r(s.LSR) & s.LSR_OE  # overrun clears on read
    for _ in range(s.FIFO_SIZE):
        u.r(s.DATA)
    assert not u.r(s.LSR) & s.LSR_DR


def test_fcr_fifo_bits_and_clear():
    u = Uart()
    assert u.r(s.IIR) & 0xC0 == 0
    u.w(s.IIR, s.FCR_ENABLE)
    assert u.r(s.IIR) & 0xC0 == 0xC0  # 16550A
    u.dev.enqueue_input(b"abc")
    u.w(s.IIR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    assert not u.r(s.LSR) & s.LSR_DR


def test_loopback():
    u = Uart()
    u.w(s.MCR, s.MCR_LOOP | 0x0A)  # Linux's autoconfig loopback test
    assert u.r(s.MSR) & 0xF0 == 0x90
    u.w(s.MCR, s.MCR_LOOP | 0x0F)
    assert u.r(s.MSR) & 0xF0 == 0xF0
    u.w(s.DATA, 0x42)
    assert bytes(u.out) == b""  # looped back, not sent
    assert u.r(s.LSR) & s.LSR_DR and u.r(s.DATA) == 0x42


def test_writer_errors_do_not_reach_the_vcpu():
    def broken(_):
        raise BrokenPipeError()

    dev = Serial(broken, lambda: None)
    dev.write(s.DATA, memoryview(b"x"))
    assert dev.output_errors == 1


def test_state_round_trip_and_validation():
    u = Uart()
    u.w(s.IER, s.IER_RDA)
    u.w(s.SCR, 7)
    u.dev.enqueue_input(b"qq")
    state = u.dev.save_state()
    v = Uart()
    v.dev.restore_state(state)
    assert v.r(s.SCR) == 7 and v.r(s.DATA) == ord("q")
    for bad in ({}, {**state, "fifo": bytes(65)}, {**state, "ier": "x"}, {**state, "ier": True}):
        with pytest.raises(SnapshotFormatError):
            Uart().dev.restore_state(bad)


def test_offered_input_waits_instead_of_overrunning():
    """A chardev offers input: the UART takes what fits, signals no overrun, drops nothing, and
    asks for more (on_room) once the guest drained the FIFO."""
    u = Uart()
    rooms = []
    u.dev.on_room = lambda: rooms.append(True)
    data = bytes(range(100))
    taken = u.dev.offer_input(data)
    assert taken == s.FIFO_SIZE and u.dev.dropped_input == 0
    assert not u.r(s.LSR) & s.LSR_OE
    assert u.dev.offer_input(data[taken:]) == 0  # full: the sender keeps it
    got = bytes(u.r(s.DATA) for _ in range(s.FIFO_SIZE - 1))
    assert rooms == []  # not empty yet
    got += bytes([u.r(s.DATA)])
    assert rooms == [True] and got == data[:taken]
    assert u.dev.offer_input(data[taken:]) == len(data) - s.FIFO_SIZE
