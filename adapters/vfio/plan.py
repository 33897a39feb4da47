"""Planning, without ioctls: which guest RAM the IOMMU maps, and which parts of a BAR are mmapped.

VFIO_IOMMU_MAP_DMA takes (iova, host vaddr, size) with all three aligned to the IOMMU's smallest
page, inside the container's usable IOVA ranges. The IOVA is the guest-physical address, so the
device's DMA addresses (which the guest driver computes from guest-physical addresses) land in the
right host pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_PAGE = 4096


class PlanError(ValueError):
    """A layout the IOMMU cannot map; the text is one line for the user."""


@dataclass(frozen=True)
class DmaMapping:
    iova: int
    vaddr: int
    size: int

    @property
    def end(self) -> int:
        return self.iova + self.size


def iommu_page_size(pgsizes: int) -> int:
    """The smallest page of VFIO_IOMMU_GET_INFO's iova_pgsizes bitmap (4 KiB when not reported)."""
    if pgsizes <= 0:
        return DEFAULT_PAGE
    return pgsizes & -pgsizes


def plan_dma(regions: Iterable[tuple[int, int, int]], page_size: int,
             iova_ranges: Sequence[tuple[int, int]] = ()) -> list[DmaMapping]:
    """One mapping per guest RAM region, (gpa, size, host vaddr) -> (iova=gpa, vaddr, size).

    ``iova_ranges`` are the container's usable (start, end-inclusive) ranges; empty means the
    kernel did not report them (older kernels) and any IOVA is tried.
    """
    if page_size <= 0 or page_size & (page_size - 1):
        raise PlanError(f"IOMMU page size {page_size:#x} is not a power of two")
    out: list[DmaMapping] = []
    for gpa, size, vaddr in sorted(regions):
        if size == 0:
            continue
        for what, value in (("guest address", gpa), ("size", size), ("host address", vaddr)):
            if value % page_size:
                raise PlanError(f"guest RAM region at {gpa:#x} ({what} {value:#x}) is not aligned to "
                                f"the IOMMU page size {page_size:#x}")
        m = DmaMapping(gpa, vaddr, size)
        if out and out[-1].end > m.iova:
            raise PlanError(f"guest RAM regions at {out[-1].iova:#x} and {gpa:#x} overlap")
        if iova_ranges and not any(lo <= m.iova and m.end - 1 <= hi for lo, hi in iova_ranges):
            usable = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in iova_ranges)
            raise PlanError(f"guest RAM {m.iova:#x}-{m.end - 1:#x} is outside the IOMMU's usable "
                            f"addresses ({usable})")
        out.append(m)
    return out


def plan_mmap(region_size: int, mappable: bool, sparse: Sequence[tuple[int, int]] | None,
              page_size: int = DEFAULT_PAGE) -> tuple[tuple[int, int], ...]:
    """The (offset, size) parts of a region to mmap.

    Without the MMAP flag, nothing. With a sparse-mmap capability, only its areas (the kernel
    leaves out the MSI-X table, which must trap); else the whole region. Areas that are empty,
    unaligned or outside the region are left to read/write, which always works.
    """
    if not mappable or region_size == 0:
        return ()
    areas = sparse if sparse is not None else ((0, region_size),)
    return tuple(
        (off, size) for off, size in sorted(areas)
        if size > 0 and off % page_size == 0 and size % page_size == 0 and off + size <= region_size
    )
