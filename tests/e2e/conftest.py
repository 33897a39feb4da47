import pytest

from tests.e2e.qmpclient import VmmProcess


@pytest.fixture
def image(tmp_path):
    def make(name="disk.img", size=8 << 20):
        p = tmp_path / name
        with open(p, "wb") as f:
            f.truncate(size)
        return str(p)
    return make


@pytest.fixture
def vmm(tmp_path):
    """Start `pystrato -accel test ...`; killed at teardown if still running."""
    procs = []

    def start(*args, sock_name="qmp.sock", accel="test", wait=True):
        sock = str(tmp_path / sock_name)
        extra = ["-accel", accel] if accel else []
        p = VmmProcess([*extra, *args], sock, wait=wait)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
