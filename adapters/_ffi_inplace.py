"""Build a cffi extension in place, beside its ``_ffi_build.py`` (``python adapters/X/_ffi_build.py``
from the repository root), for development without reinstalling.

The .so gets the name pip's build gives it (cffi builds for the stable ABI): a second,
differently named copy would shadow whichever of the two is rebuilt later. The generated .c and
.o stay in a temporary directory.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile


def build_in_place(ffibuilder, build_file: str, stem: str) -> None:
    here = pathlib.Path(build_file).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=False)
        for stale in here.glob(f"{stem}*.so"):
            stale.unlink()
        shutil.copy2(built, here / f"{stem}.abi3.so")
