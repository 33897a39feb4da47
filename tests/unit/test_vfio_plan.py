"""DMA-map and BAR-mmap planning for VFIO, without ioctls."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.vfio.plan import (
    DmaMapping,
    PlanError,
    iommu_page_size,
    plan_dma,
    plan_mmap,
)

MiB, GiB = 1 << 20, 1 << 30


@pytest.mark.parametrize("bitmap, page", [
    (0x1000 | 0x200000 | 0x40000000, 0x1000),  # Intel VT-d: 4K, 2M, 1G
    (~0xFFF & (1 << 64) - 1, 0x1000),  # type1's "every size from 4K" answer
    (0x10000 | 0x20000000, 0x10000),  # a 64K-page IOMMU
    (0, 4096),  # not reported
])
def test_iommu_page_size_is_the_smallest_page(bitmap, page):
    assert iommu_page_size(bitmap) == page


def test_plan_maps_each_region_at_its_guest_address():
    # q35 with 4 GiB: RAM below the PCI hole and the rest above 4 GiB, out of order.
    regions = [(4 * GiB, 1 * GiB, 0x7F00_4000_0000), (0, 3 * GiB, 0x7F00_0000_0000)]
    assert plan_dma(regions, 4096) == [
        DmaMapping(0, 0x7F00_0000_0000, 3 * GiB),
        DmaMapping(4 * GiB, 0x7F00_4000_0000, 1 * GiB),
    ]


def test_plan_skips_empty_regions():
    assert plan_dma([(0, 0, 0x1000), (1 * MiB, 4096, 0x2000)], 4096) == [DmaMapping(1 * MiB, 0x2000, 4096)]


@pytest.mark.parametrize("region, what", [
    ((0x800, 4096, 0x10000), "guest address 0x800"),
    ((0, 4096 + 512, 0x10000), "size 0x1200"),
    ((0, 4096, 0x10010), "host address 0x10010"),
])
def test_plan_refuses_unaligned_regions(region, what):
    with pytest.raises(PlanError, match=f"{what}.*IOMMU page size 0x1000"):
        plan_dma([region], 4096)


def test_plan_uses_the_iommu_page_not_the_cpu_page():
    with pytest.raises(PlanError, match="page size 0x10000"):
        plan_dma([(0, 0x1000, 0x10000)], 0x10000)
    assert plan_dma([(0, 0x20000, 0x30000)], 0x10000) == [DmaMapping(0, 0x30000, 0x20000)]


def test_plan_refuses_overlapping_regions():
    with pytest.raises(PlanError, match="0x0 and 0x1000 overlap"):
        plan_dma([(0, 0x2000, 0x10000), (0x1000, 0x1000, 0x20000)], 4096)


def test_plan_refuses_bad_page_sizes():
    with pytest.raises(PlanError, match="power of two"):
        plan_dma([(0, 4096, 0)], 3000)


def test_plan_checks_the_usable_iova_ranges():
    # x86: the MSI window 0xfee00000-0xfeefffff is reserved by the IOMMU.
    usable = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]
    assert plan_dma([(0, 2 * GiB, 0x10000000)], 4096, usable) == [DmaMapping(0, 0x10000000, 2 * GiB)]
    with pytest.raises(PlanError, match=r"0x0-0xffffffff is outside the IOMMU's usable addresses \(0x0-0xfedfffff"):
        plan_dma([(0, 4 * GiB, 0x10000000)], 4096, usable)
    # The inclusive end is usable: a region ending exactly there fits.
    assert plan_dma([(0xFED00000, 0x100000, 0x10000000)], 4096, usable)


@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 16)), max_size=8))
def test_plan_keeps_every_nonempty_region_once_in_order(pages):
    # Disjoint page-aligned regions built from (gap, length) pairs.
    regions, gpa = [], 0
    for gap, length in pages:
        gpa += gap * 4096
        regions.append((gpa, length * 4096, 0x7000_0000_0000 + gpa))
        gpa += length * 4096
    plan = plan_dma(list(reversed(regions)), 4096)
    assert [(m.iova, m.size, m.vaddr) for m in plan] == [r for r in regions if r[1]]
    assert all(a.end <= b.iova for a, b in itertools.pairwise(plan))


# --- BAR mmap ------------------------------------------------------------------------------------

def test_mmap_whole_region_when_mappable():
    assert plan_mmap(0x4000, True, None) == ((0, 0x4000),)


def test_mmap_nothing_when_not_mappable_or_empty():
    assert plan_mmap(0x4000, False, None) == ()
    assert plan_mmap(0, True, None) == ()


def test_mmap_only_the_sparse_areas():
    # An MSI-X table at 0x2000 in a 64 KiB BAR: the kernel offers the parts around it.
    sparse = [(0x3000, 0xD000), (0, 0x2000)]
    assert plan_mmap(0x10000, True, sparse) == ((0, 0x2000), (0x3000, 0xD000))


def test_mmap_sparse_with_no_areas_maps_nothing():
    assert plan_mmap(0x10000, True, []) == ()


def test_mmap_drops_areas_it_cannot_map():
    sparse = [(0, 0), (0x800, 0x1000), (0x2000, 0x800), (0xF000, 0x2000), (0x4000, 0x1000)]
    assert plan_mmap(0x10000, True, sparse) == ((0x4000, 0x1000),)
