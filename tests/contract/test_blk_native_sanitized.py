"""The virtio-blk C loop under AddressSanitizer and UndefinedBehaviorSanitizer: the module is
built again with both, and test_blk_native.py (its equivalence tests and its fuzzing of hostile
rings and indirect tables) runs against that build in a child process. A read or write outside
the buffers the loop was given, or undefined behaviour, aborts the child."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import importlib.util, sys
so = sys.argv[1]
spec = importlib.util.spec_from_file_location("adapters.storage._blk_cffi", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["adapters.storage._blk_cffi"] = mod
import adapters.storage.native_queue as nq
assert nq.ffi is mod.ffi, "the sanitized build is not the one in use"
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/contract/test_blk_native.py"]))
"""


def _runtime(name: str) -> str | None:
    out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def test_the_c_loop_is_clean_under_asan_and_ubsan(tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    if not asan or not ubsan:
        pytest.skip("gcc's libasan/libubsan are not installed")
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from adapters.storage._blk_ffi_build import ffibuilder; "
         "print(ffibuilder.compile(tmpdir=sys.argv[1], verbose=False))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CFLAGS": flags, "LDFLAGS": "-fsanitize=address,undefined"})
    assert build.returncode == 0, build.stderr[-3000:]
    so = build.stdout.strip().splitlines()[-1]
    # The reports go to files: pytest in the child captures fd 2, and a sanitizer exits the
    # process before pytest could show it.
    logs = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, so], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "LD_PRELOAD": f"{asan} {ubsan}",
             "ASAN_OPTIONS": f"detect_leaks=0:log_path={logs}",
             "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={logs}", "PYTHONDONTWRITEBYTECODE": "1"})
    reports = "".join(p.read_text(errors="replace") for p in tmp_path.glob("report*"))
    assert run.returncode == 0 and not reports, (reports[:4000], run.stdout[-2000:], run.stderr[-2000:])
    assert " passed" in run.stdout and "failed" not in run.stdout
