"""The compiled cffi module, with a clear message when it has not been built."""

from __future__ import annotations

try:
    from adapters.kvm._kvm_cffi import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "the KVM bindings are not built: run `pip install -e .` or "
        "`python adapters/kvm/_ffi_build.py` from the repository root"
    ) from e

__all__ = ["ffi", "lib"]
