"""cffi API-mode (out-of-line) bindings over <linux/vfio.h>.

Built by setup.py (``cffi_modules``) or in place for development with
``python adapters/vfio/_ffi_build.py`` from the repository root.

Every constant and every struct layout comes from the compiler: ``#define X ...`` and partial
structs ending in ``...;``, so cffi asks the C compiler for sizes and offsets instead of trusting
numbers copied by hand. Structs with a trailing flexible array (vfio_irq_set, the sparse-mmap and
IOVA-range capabilities) keep that member declared, so ``ffi.offsetof`` gives where it starts.
ioctl goes through two fixed-signature helpers that return ``-errno``, so no variadic call crosses
the FFI and errno is read in the same C call that failed.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

_CONSTANTS = """
VFIO_API_VERSION VFIO_TYPE1_IOMMU VFIO_TYPE1v2_IOMMU
VFIO_GET_API_VERSION VFIO_CHECK_EXTENSION VFIO_SET_IOMMU
VFIO_GROUP_GET_STATUS VFIO_GROUP_FLAGS_VIABLE VFIO_GROUP_FLAGS_CONTAINER_SET
VFIO_GROUP_SET_CONTAINER VFIO_GROUP_UNSET_CONTAINER VFIO_GROUP_GET_DEVICE_FD
VFIO_DEVICE_GET_INFO VFIO_DEVICE_FLAGS_RESET VFIO_DEVICE_FLAGS_PCI VFIO_DEVICE_FLAGS_CAPS
VFIO_DEVICE_GET_REGION_INFO VFIO_REGION_INFO_FLAG_READ VFIO_REGION_INFO_FLAG_WRITE
VFIO_REGION_INFO_FLAG_MMAP VFIO_REGION_INFO_FLAG_CAPS VFIO_REGION_INFO_CAP_SPARSE_MMAP
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE
VFIO_DEVICE_GET_IRQ_INFO VFIO_IRQ_INFO_EVENTFD VFIO_IRQ_INFO_MASKABLE VFIO_IRQ_INFO_AUTOMASKED
VFIO_IRQ_INFO_NORESIZE
VFIO_DEVICE_SET_IRQS VFIO_IRQ_SET_DATA_NONE VFIO_IRQ_SET_DATA_BOOL VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_MASK VFIO_IRQ_SET_ACTION_UNMASK VFIO_IRQ_SET_ACTION_TRIGGER
VFIO_DEVICE_RESET
VFIO_IOMMU_GET_INFO VFIO_IOMMU_INFO_PGSIZES VFIO_IOMMU_INFO_CAPS
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
VFIO_IOMMU_MAP_DMA VFIO_IOMMU_UNMAP_DMA VFIO_DMA_MAP_FLAG_READ VFIO_DMA_MAP_FLAG_WRITE
VFIO_PCI_BAR0_REGION_INDEX VFIO_PCI_BAR1_REGION_INDEX VFIO_PCI_BAR2_REGION_INDEX
VFIO_PCI_BAR3_REGION_INDEX VFIO_PCI_BAR4_REGION_INDEX VFIO_PCI_BAR5_REGION_INDEX
VFIO_PCI_ROM_REGION_INDEX VFIO_PCI_CONFIG_REGION_INDEX VFIO_PCI_VGA_REGION_INDEX
VFIO_PCI_NUM_REGIONS
VFIO_PCI_INTX_IRQ_INDEX VFIO_PCI_MSI_IRQ_INDEX VFIO_PCI_MSIX_IRQ_INDEX VFIO_PCI_ERR_IRQ_INDEX
VFIO_PCI_REQ_IRQ_INDEX VFIO_PCI_NUM_IRQS
""".split()

_CDEF = (
    "\n".join(f"#define {name} ..." for name in _CONSTANTS)
    + """
struct vfio_info_cap_header { uint16_t id; uint16_t version; uint32_t next; ...; };
struct vfio_group_status { uint32_t argsz; uint32_t flags; ...; };
struct vfio_device_info {
    uint32_t argsz; uint32_t flags; uint32_t num_regions; uint32_t num_irqs; ...;
};
struct vfio_region_info {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t cap_offset;
    uint64_t size; uint64_t offset; ...;
};
struct vfio_region_sparse_mmap_area { uint64_t offset; uint64_t size; ...; };
struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header; uint32_t nr_areas;
    struct vfio_region_sparse_mmap_area areas[]; ...;
};
struct vfio_irq_info { uint32_t argsz; uint32_t flags; uint32_t index; uint32_t count; ...; };
struct vfio_irq_set {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t start; uint32_t count;
    uint8_t data[]; ...;
};
struct vfio_iommu_type1_info {
    uint32_t argsz; uint32_t flags; uint64_t iova_pgsizes; uint32_t cap_offset; ...;
};
struct vfio_iova_range { uint64_t start; uint64_t end; ...; };
struct vfio_iommu_type1_info_cap_iova_range {
    struct vfio_info_cap_header header; uint32_t nr_iovas;
    struct vfio_iova_range iova_ranges[]; ...;
};
struct vfio_iommu_type1_dma_map {
    uint32_t argsz; uint32_t flags; uint64_t vaddr; uint64_t iova; uint64_t size; ...;
};
struct vfio_iommu_type1_dma_unmap {
    uint32_t argsz; uint32_t flags; uint64_t iova; uint64_t size; ...;
};

int px_vfio_ioctl_int(int fd, unsigned long req, unsigned long arg);
int px_vfio_ioctl_ptr(int fd, unsigned long req, void *arg);
"""
)

_SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/vfio.h>

static int px_vfio_ret(int r) { return r < 0 ? -errno : r; }

static int px_vfio_ioctl_int(int fd, unsigned long req, unsigned long arg)
{ return px_vfio_ret(ioctl(fd, req, arg)); }

static int px_vfio_ioctl_ptr(int fd, unsigned long req, void *arg)
{ return px_vfio_ret(ioctl(fd, req, arg)); }
"""

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source("adapters.vfio._vfio_cffi", _SOURCE)

if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run as a script
    from adapters._ffi_inplace import build_in_place

    build_in_place(ffibuilder, __file__, "_vfio_cffi")
