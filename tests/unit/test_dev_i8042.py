import pytest

from domain.devices import i8042 as k
from domain.devices.i8042 import I8042
from domain.errors import SnapshotFormatError


class Ctl:
    def __init__(self):
        self.resets = 0
        self.dev = I8042(self.reset)

    def reset(self):
        self.resets += 1

    def status(self):
        buf = bytearray(1)
        self.dev.read(k.COMMAND, memoryview(buf))
        return buf[0]

    def data(self):
        buf = bytearray(1)
        self.dev.read(k.DATA, memoryview(buf))
        return buf[0]

    def cmd(self, v):
        self.dev.write(k.COMMAND, memoryview(bytes([v])))

    def put(self, v):
        self.dev.write(k.DATA, memoryview(bytes([v])))


def test_reset_command_calls_reset():
    c = Ctl()
    assert not c.status() & 0x02  # input buffer empty: Linux's kb_wait() passes
    c.cmd(0xFE)
    assert c.resets == 1


def test_pulse_and_output_port_reset():
    c = Ctl()
    c.cmd(0xF0)  # pulse bit 0 low
    assert c.resets == 1
    c.cmd(0xFF)  # pulse nothing
    assert c.resets == 1
    c.cmd(k.CMD_WRITE_OUTPORT)
    c.put(0x02)  # reset line low
    assert c.resets == 2


def test_probe_commands_are_answered():
    c = Ctl()
    assert not c.status() & k.ST_OBF
    c.cmd(k.CMD_SELF_TEST)
    assert c.status() & k.ST_OBF and c.data() == 0x55
    assert not c.status() & k.ST_OBF
    c.cmd(k.CMD_KBD_TEST)
    assert c.data() == 0
    c.cmd(k.CMD_READ_CTR)
    ctr = c.data()
    c.cmd(k.CMD_WRITE_CTR)
    c.put(ctr | k.CTR_AUX_DISABLE)
    c.cmd(k.CMD_READ_CTR)
    assert c.data() == ctr | k.CTR_AUX_DISABLE
    c.cmd(k.CMD_AUX_ENABLE)
    c.cmd(k.CMD_READ_CTR)
    assert not c.data() & k.CTR_AUX_DISABLE
    c.cmd(k.CMD_WRITE_AUX_OUTBUF)
    c.put(0x5A)  # Linux's aux loopback test
    assert c.status() & (k.ST_OBF | k.ST_AUX_OBF) == k.ST_OBF | k.ST_AUX_OBF
    assert c.data() == 0x5A
    c.cmd(0x99)  # unknown: ignored
    assert not c.status() & k.ST_OBF
    assert c.resets == 0


def test_output_buffer_is_bounded():
    c = Ctl()
    for _ in range(100):
        c.cmd(k.CMD_SELF_TEST)
    n = 0
    while c.status() & k.ST_OBF:
        c.data()
        n += 1
    assert n == k.OUTBUF_MAX


def test_state_round_trip():
    c = Ctl()
    c.cmd(k.CMD_READ_CTR)
    st = c.dev.save_state()
    d = Ctl()
    d.dev.restore_state(st)
    assert d.data() == k.CTR_DEFAULT
    with pytest.raises(SnapshotFormatError):
        d.dev.restore_state({**st, "outbuf": [[1]]})
