"""adapters/storage/block.py on a real file: preadv/pwritev into memoryviews, the image's I/O
threads (submit), direct=on with unaligned buffers, read-only images, close."""

import errno
import mmap
import threading

import pytest

from adapters.storage.block import IO_THREADS, RawImageOpener
from domain.errors import HostResourceError


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return str(path)


def test_readv_writev_flush(image):
    img = RawImageOpener().open(image, readonly=False, direct=False)
    try:
        a, b = bytearray(512), bytearray(512)
        assert img.readv(512, [memoryview(a), memoryview(b)]) == 1024
        assert a == (bytes(range(256)) * 2) and b == a
        assert img.writev(0, [memoryview(b"\x11" * 512)]) == 512
        img.flush()
        assert img.size == 16384
    finally:
        img.close()
    assert open(image, "rb").read(512) == b"\x11" * 512


def test_submitted_work_runs_on_the_image_threads_concurrently(image):
    img = RawImageOpener().open(image, readonly=False, direct=False)
    try:
        n = IO_THREADS
        inside = threading.Barrier(n + 1)  # only passes if n jobs run at the same time
        finished = threading.Semaphore(0)
        done = []
        names = set()

        def job(i):
            names.add(threading.current_thread().name)
            inside.wait(10)
            buf = bytearray(512)
            done.append((i, img.readv(512 * i, [memoryview(buf)])))
            finished.release()

        for i in range(n):
            img.submit(job, i)
        inside.wait(10)
        for _ in range(n):
            assert finished.acquire(timeout=10)
        assert sorted(done) == [(i, 512) for i in range(n)]
        assert threading.current_thread().name not in names and len(names) == n
    finally:
        img.close()


def test_submit_after_close_runs_in_the_caller(image):
    img = RawImageOpener().open(image, readonly=False, direct=False)
    img.submit(lambda _: None, None)  # threads started
    img.close()
    ran = []
    img._threads.submit(lambda x: ran.append((x, threading.current_thread().name)), 7)
    assert ran == [(7, threading.current_thread().name)]


def test_a_failing_job_does_not_kill_the_thread(image):
    img = RawImageOpener().open(image, readonly=False, direct=False)
    try:
        ok = threading.Event()

        def boom(_):
            raise RuntimeError("device bug")

        for _ in range(20):  # more jobs than threads: some thread runs two
            img.submit(boom, None)
        img.submit(lambda _: ok.set(), None)
        assert ok.wait(10)
    finally:
        img.close()


def test_direct_falls_back_to_buffered_for_unaligned_buffers(image):
    try:
        img = RawImageOpener().open(image, readonly=False, direct=True)
    except HostResourceError:
        pytest.skip("no O_DIRECT on this file system")
    try:
        page = mmap.mmap(-1, 4096)
        view = memoryview(page)
        assert img.readv(4096, [view]) == 4096  # aligned: O_DIRECT
        one = bytearray(1)
        assert img.readv(5, [memoryview(one)]) == 1 and one[0] == 5  # unaligned: buffered
        view.release()
        page.close()
    finally:
        img.close()


def test_readonly_image_refuses_writes(image):
    img = RawImageOpener().open(image, readonly=True, direct=False)
    try:
        with pytest.raises(OSError) as e:
            img.writev(0, [memoryview(b"x" * 512)])
        assert e.value.errno == errno.EROFS
        img.flush()  # nothing to flush, no error
    finally:
        img.close()


def test_open_errors_are_typed(tmp_path):
    with pytest.raises(HostResourceError, match="cannot open"):
        RawImageOpener().open(str(tmp_path / "missing.img"), readonly=True, direct=False)
    with pytest.raises(HostResourceError, match="Is a directory"):
        RawImageOpener().open(str(tmp_path), readonly=True, direct=False)
