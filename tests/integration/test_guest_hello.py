"""hello: exact serial output, then the guest's i8042 reset ends pystrato with SHUTDOWN."""

from __future__ import annotations

import secrets

import pytest

pytestmark = pytest.mark.kvm


def test_serial_output_is_exact_and_i8042_reset_ends_the_vmm(vm, guest):
    token = secrets.token_hex(6)
    v = vm(guest("hello"), f"gate token={token}")
    v.qmp()  # connected before the guest runs, so no event can be missed
    v.send_serial(b"g")
    shutdown = v.qmp().wait_event("SHUTDOWN", timeout=30)
    assert shutdown["data"] == {"guest": True, "reason": "guest-reset"}
    assert v.wait_exit() == 0
    assert v.output == f"hello from the pystrato test guest: {token}\n"
    assert "Traceback" not in v.stderr


def test_without_qmp_client_the_guest_reset_still_exits_zero(vm, guest):
    v = vm(guest("hello"), "token=plain")
    assert v.wait_exit(60) == 0
    assert v.output == "hello from the pystrato test guest: plain\n"
