"""Only the cffi build hook: everything else is in pyproject.toml.

`cffi_modules` is a setup() keyword (cffi's setuptools plugin), so it cannot live in
pyproject.toml: it compiles adapters/kvm/_ffi_build.py into adapters.kvm._kvm_cffi,
adapters/vfio/_ffi_build.py into adapters.vfio._vfio_cffi and adapters/storage/_blk_ffi_build.py
into adapters.storage._blk_cffi.
"""

from setuptools import setup

setup(cffi_modules=["adapters/kvm/_ffi_build.py:ffibuilder", "adapters/vfio/_ffi_build.py:ffibuilder",
                   "adapters/storage/_blk_ffi_build.py:ffibuilder"])
