"""The hypervisor port on Linux KVM, through cffi bindings built from <linux/kvm.h>.

Public API: KvmHypervisor (adapters.kvm.hypervisor), KvmVm (.vm), KvmVcpu (.vcpu),
KvmIoctlError (.errors), the CPUID rules (.cpuid). Importing this package does not load the
compiled module; the names below are resolved on first use.
"""

from __future__ import annotations

_EXPORTS = {
    "KvmHypervisor": "adapters.kvm.hypervisor",
    "KvmVm": "adapters.kvm.vm",
    "KvmVcpu": "adapters.kvm.vcpu",
    "KvmIoctlError": "adapters.kvm.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
