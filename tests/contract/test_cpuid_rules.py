"""The CPUID fix-ups of adapters.kvm.cpuid, on synthetic entries (no /dev/kvm needed)."""

from __future__ import annotations

import pytest

from adapters.kvm.cpuid import FEATURES, check_features, normalize, visible_features
from domain.cpu_state import VcpuSetup
from domain.errors import HypervisorError

SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

INTEL = [
    [0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69],  # GenuineIntel, max leaf 0x1F
    [1, 0, 0, 0xC06F2, 0x00FF0800, 1 << 23 | 1 << 21, 1 << 28],
    [4, 0, SIG, 0x121, 0, 0, 0],  # L1d
    [4, 1, SIG, 0x143, 0, 0, 0],  # L2
    [4, 2, SIG, 0x163, 0, 0, 0],  # L3
    [4, 3, SIG, 0, 0, 0, 0],  # end of list
    [7, 0, SIG, 0, 1 << 5 | 1 << 3, 1 << 22, 0],
    [0xB, 0, SIG, 0, 0, 0, 0],
    [0x1F, 0, SIG, 0, 0, 0, 0],
    [0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D],
    [0x80000008, 0, 0, 0x3030, 0, 0, 0],
]


def leaf(entries, fn, idx=0):
    return next(e for e in entries if e[0] == fn and e[1] == idx)


def test_leaf1_identity_and_counts():
    out = normalize(INTEL, VcpuSetup(index=5, apic_id=5, nr_vcpus=8, threads_per_core=2, cores_per_socket=4), SIG)
    e = leaf(out, 1)
    assert e[4] >> 24 == 5
    assert (e[4] >> 16) & 0xFF == 8
    assert e[4] & 0xFFFF == 0x0800  # CLFLUSH size kept
    assert e[5] >> 31 == 1 and e[6] & 1 << 28


def test_single_cpu_has_no_htt():
    out = normalize(INTEL, VcpuSetup(index=0, apic_id=0, nr_vcpus=1), SIG)
    e = leaf(out, 1)
    assert not e[6] & 1 << 28 and (e[4] >> 16) & 0xFF == 1


def test_cache_leaves_share_by_level():
    out = normalize(INTEL, VcpuSetup(index=0, apic_id=0, nr_vcpus=8, threads_per_core=2, cores_per_socket=4), SIG)
    l1, l2, l3, end = (leaf(out, 4, i) for i in range(4))
    assert (l1[3] >> 14) & 0xFFF == 1 and (l2[3] >> 14) & 0xFFF == 1  # per core: 2 threads
    assert (l3[3] >> 14) & 0xFFF == 7  # the package: 8 threads
    assert l1[3] >> 26 == 3  # 4 cores
    assert l1[3] & 0x3FFF == 0x121  # type and level kept
    assert end[3] == 0


@pytest.mark.parametrize("topology_leaf", [0xB, 0x1F])
def test_x2apic_topology_per_vcpu(topology_leaf):
    out = normalize(INTEL, VcpuSetup(index=6, apic_id=6, nr_vcpus=8, threads_per_core=2, cores_per_socket=4), SIG)
    subs = sorted((e for e in out if e[0] == topology_leaf), key=lambda e: e[1])
    assert [e[1] for e in subs] == [0, 1, 2]
    smt, core, end = subs
    assert (smt[3], smt[4], smt[5] >> 8) == (1, 2, 1)  # shift 1, 2 threads, SMT level
    assert (core[3], core[4], core[5] >> 8) == (3, 8, 2)  # shift 3, 8 per package, core level
    assert end[5] >> 8 == 0 and end[3] == end[4] == 0
    assert all(e[6] == 6 and e[2] & SIG for e in subs)


def test_hidden_features_are_cleared_and_others_kept():
    cfg = VcpuSetup(index=0, apic_id=0, nr_vcpus=1, hidden_features=("popcnt", "avx2", "rdpid"))
    out = normalize(INTEL, cfg, SIG)
    assert not leaf(out, 1)[5] & 1 << 23 and leaf(out, 1)[5] & 1 << 21  # x2apic stays
    assert leaf(out, 7)[4] == 1 << 3 and leaf(out, 7)[5] == 0
    assert visible_features(out, ("popcnt", "x2apic", "bmi1")) == ("x2apic", "bmi1")


def test_input_is_not_modified_and_pv_leaves_pass_through():
    before = [list(e) for e in INTEL]
    out = normalize(INTEL, VcpuSetup(index=1, apic_id=1, nr_vcpus=2), SIG)
    assert INTEL == before
    assert leaf(out, 0x40000000) == leaf(INTEL, 0x40000000)


def test_amd_core_count():
    amd = [list(e) for e in INTEL]
    amd[0][4:7] = [0x68747541, 0x444D4163, 0x69746E65]  # AuthenticAMD
    out = normalize(amd, VcpuSetup(index=0, apic_id=0, nr_vcpus=4, cores_per_socket=4), SIG)
    e = leaf(out, 0x80000008)
    assert e[5] & 0xFF == 3 and (e[5] >> 12) & 0xF == 2


def test_unknown_feature_names_are_refused():
    with pytest.raises(HypervisorError, match="bogus"):
        check_features(["avx", "bogus"])
    assert all(len(v) == 4 and v[2] in ("eax", "ebx", "ecx", "edx") for v in FEATURES.values())
