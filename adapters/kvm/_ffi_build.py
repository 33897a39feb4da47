"""cffi API-mode (out-of-line) bindings over <linux/kvm.h>.

Built by setup.py (``cffi_modules``) or in place for development with
``python adapters/kvm/_ffi_build.py`` from the repository root.

Every constant and every struct offset comes from the compiler (``#define X ...`` and partial
structs ending in ``...;``), never from numbers copied by hand. ioctl goes through helpers with a
fixed signature that return ``-errno`` on failure, so no variadic call crosses the FFI and the
error code is read in the same C call that failed.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

_CONSTANTS = """
KVM_API_VERSION KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
KVM_CREATE_VCPU KVM_RUN KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP
KVM_CREATE_PIT2 KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK
KVM_SET_CLOCK KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_DEBUGREGS
KVM_SET_DEBUGREGS KVM_GET_TSC_KHZ
KVM_CAP_IRQCHIP KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR
KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_PIT2 KVM_CAP_PIT_STATE2 KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_EXT_CPUID KVM_CAP_MP_STATE KVM_CAP_ADJUST_CLOCK KVM_CAP_VCPU_EVENTS KVM_CAP_DEBUGREGS
KVM_CAP_XSAVE KVM_CAP_XCRS KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_MAX_VCPU_ID
KVM_CAP_READONLY_MEM KVM_CAP_NR_MEMSLOTS KVM_CAP_TSC_DEADLINE_TIMER
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY KVM_IRQFD_FLAG_DEASSIGN KVM_IOEVENTFD_FLAG_DATAMATCH
KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN KVM_PIT_SPEAKER_DUMMY KVM_IRQCHIP_PIC_MASTER
KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC KVM_MP_STATE_RUNNABLE KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_SIGNAL_MSI KVM_CAP_SIGNAL_MSI
PX_RUN_EXIT_REASON PX_RUN_IMMEDIATE_EXIT PX_RUN_IO_DIRECTION PX_RUN_IO_SIZE PX_RUN_IO_PORT
PX_RUN_IO_COUNT PX_RUN_IO_DATA_OFFSET PX_RUN_MMIO_PHYS_ADDR PX_RUN_MMIO_DATA PX_RUN_MMIO_LEN
PX_RUN_MMIO_IS_WRITE PX_RUN_FAIL_ENTRY_REASON PX_RUN_INTERNAL_SUBERROR PX_RUN_SYSTEM_EVENT_TYPE
PX_SZ_IO_DIRECTION PX_SZ_IO_SIZE PX_SZ_IO_PORT PX_SZ_IO_COUNT PX_SZ_IO_DATA_OFFSET
PX_SZ_MMIO_PHYS_ADDR PX_SZ_MMIO_DATA PX_SZ_MMIO_LEN PX_SZ_MMIO_IS_WRITE
PX_SZ_FAIL_ENTRY_REASON PX_SZ_INTERNAL_SUBERROR PX_SZ_SYSTEM_EVENT_TYPE PX_SZ_EXIT_REASON
PX_SZ_IMMEDIATE_EXIT
""".split()

_CDEF = (
    "\n".join(f"#define {name} ..." for name in _CONSTANTS)
    + """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
    ...;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable;
    ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    ...;
};
struct kvm_fpu { uint16_t fcw; uint32_t mxcsr; ...; };
struct kvm_lapic_state { char regs[...]; ...; };
struct kvm_xsave { ...; };
struct kvm_xcrs { ...; };
struct kvm_mp_state { uint32_t mp_state; ...; };
struct kvm_vcpu_events { ...; };
struct kvm_debugregs { ...; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx;
    ...;
};

int px_ioctl_int(int fd, unsigned long req, unsigned long arg);
int px_ioctl_ptr(int fd, unsigned long req, void *arg);
int px_run(int vcpu_fd);
int px_set_memory_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
                         uint64_t uaddr);
int px_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap);
int px_irq_line(int vm_fd, uint32_t irq, uint32_t level);
int px_irqfd(int vm_fd, int fd, uint32_t gsi, uint32_t flags);
int px_ioeventfd(int vm_fd, int fd, uint64_t addr, uint32_t len, uint64_t datamatch,
                 uint32_t flags);
int px_create_pit2(int vm_fd, uint32_t flags);
int px_signal_msi(int vm_fd, uint64_t address, uint32_t data);
int px_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *out, int max);
int px_get_cpuid2(int vcpu_fd, struct kvm_cpuid_entry2 *out, int max);
int px_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int n);
int px_get_msr_index_list(int kvm_fd, uint32_t *out, int max);
int px_get_msrs(int vcpu_fd, const uint32_t *index, uint64_t *value, int n);
int px_set_msrs(int vcpu_fd, const uint32_t *index, const uint64_t *value, int n);
int px_install_kick_handler(int signo);
"""
)

_SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define PX_OFF(m) offsetof(struct kvm_run, m)
#define PX_SZ(m) sizeof(((struct kvm_run *)0)->m)
#define PX_RUN_EXIT_REASON PX_OFF(exit_reason)
#define PX_RUN_IMMEDIATE_EXIT PX_OFF(immediate_exit)
#define PX_RUN_IO_DIRECTION PX_OFF(io.direction)
#define PX_RUN_IO_SIZE PX_OFF(io.size)
#define PX_RUN_IO_PORT PX_OFF(io.port)
#define PX_RUN_IO_COUNT PX_OFF(io.count)
#define PX_RUN_IO_DATA_OFFSET PX_OFF(io.data_offset)
#define PX_RUN_MMIO_PHYS_ADDR PX_OFF(mmio.phys_addr)
#define PX_RUN_MMIO_DATA PX_OFF(mmio.data)
#define PX_RUN_MMIO_LEN PX_OFF(mmio.len)
#define PX_RUN_MMIO_IS_WRITE PX_OFF(mmio.is_write)
#define PX_RUN_FAIL_ENTRY_REASON PX_OFF(fail_entry.hardware_entry_failure_reason)
#define PX_RUN_INTERNAL_SUBERROR PX_OFF(internal.suberror)
#define PX_RUN_SYSTEM_EVENT_TYPE PX_OFF(system_event.type)
#define PX_SZ_EXIT_REASON PX_SZ(exit_reason)
#define PX_SZ_IMMEDIATE_EXIT PX_SZ(immediate_exit)
#define PX_SZ_IO_DIRECTION PX_SZ(io.direction)
#define PX_SZ_IO_SIZE PX_SZ(io.size)
#define PX_SZ_IO_PORT PX_SZ(io.port)
#define PX_SZ_IO_COUNT PX_SZ(io.count)
#define PX_SZ_IO_DATA_OFFSET PX_SZ(io.data_offset)
#define PX_SZ_MMIO_PHYS_ADDR PX_SZ(mmio.phys_addr)
#define PX_SZ_MMIO_DATA PX_SZ(mmio.data)
#define PX_SZ_MMIO_LEN PX_SZ(mmio.len)
#define PX_SZ_MMIO_IS_WRITE PX_SZ(mmio.is_write)
#define PX_SZ_FAIL_ENTRY_REASON PX_SZ(fail_entry.hardware_entry_failure_reason)
#define PX_SZ_INTERNAL_SUBERROR PX_SZ(internal.suberror)
#define PX_SZ_SYSTEM_EVENT_TYPE PX_SZ(system_event.type)

static int px_ret(int r) { return r < 0 ? -errno : r; }

static int px_ioctl_int(int fd, unsigned long req, unsigned long arg)
{ return px_ret(ioctl(fd, req, arg)); }

static int px_ioctl_ptr(int fd, unsigned long req, void *arg)
{ return px_ret(ioctl(fd, req, arg)); }

static int px_run(int vcpu_fd) { return px_ret(ioctl(vcpu_fd, KVM_RUN, 0)); }

static int px_set_memory_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa,
                                uint64_t size, uint64_t uaddr)
{
    struct kvm_userspace_memory_region r;
    memset(&r, 0, sizeof r);
    r.slot = slot; r.flags = flags; r.guest_phys_addr = gpa; r.memory_size = size;
    r.userspace_addr = uaddr;
    return px_ret(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r));
}

static int px_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap)
{
    struct kvm_dirty_log d;
    memset(&d, 0, sizeof d);
    d.slot = slot; d.dirty_bitmap = bitmap;
    return px_ret(ioctl(vm_fd, KVM_GET_DIRTY_LOG, &d));
}

static int px_irq_line(int vm_fd, uint32_t irq, uint32_t level)
{
    struct kvm_irq_level l;
    memset(&l, 0, sizeof l);
    l.irq = irq; l.level = level;
    return px_ret(ioctl(vm_fd, KVM_IRQ_LINE, &l));
}

static int px_irqfd(int vm_fd, int fd, uint32_t gsi, uint32_t flags)
{
    struct kvm_irqfd f;
    memset(&f, 0, sizeof f);
    f.fd = (uint32_t)fd; f.gsi = gsi; f.flags = flags;
    return px_ret(ioctl(vm_fd, KVM_IRQFD, &f));
}

static int px_ioeventfd(int vm_fd, int fd, uint64_t addr, uint32_t len, uint64_t datamatch,
                        uint32_t flags)
{
    struct kvm_ioeventfd e;
    memset(&e, 0, sizeof e);
    e.fd = fd; e.addr = addr; e.len = len; e.datamatch = datamatch; e.flags = flags;
    return px_ret(ioctl(vm_fd, KVM_IOEVENTFD, &e));
}

static int px_create_pit2(int vm_fd, uint32_t flags)
{
    struct kvm_pit_config c;
    memset(&c, 0, sizeof c);
    c.flags = flags;
    return px_ret(ioctl(vm_fd, KVM_CREATE_PIT2, &c));
}

/* KVM answers > 0 delivered, 0 blocked by the guest, -1 (EPERM) when no LAPIC matched. */
static int px_signal_msi(int vm_fd, uint64_t address, uint32_t data)
{
    struct kvm_msi m;
    memset(&m, 0, sizeof m);
    m.address_lo = (uint32_t)address; m.address_hi = (uint32_t)(address >> 32); m.data = data;
    return px_ret(ioctl(vm_fd, KVM_SIGNAL_MSI, &m));
}

/* kvm_cpuid2 ends in a flexible array: build it here so Python only sees plain entries. */
static int px_cpuid_call(int fd, unsigned long req, struct kvm_cpuid_entry2 *out, int max)
{
    size_t sz = sizeof(struct kvm_cpuid2) + (size_t)max * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, sz);
    int r;
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)max;
    r = ioctl(fd, req, c);
    if (r < 0) { r = -errno; free(c); return r; }
    memcpy(out, c->entries, c->nent * sizeof(struct kvm_cpuid_entry2));
    r = (int)c->nent;
    free(c);
    return r;
}

static int px_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *out, int max)
{ return px_cpuid_call(kvm_fd, KVM_GET_SUPPORTED_CPUID, out, max); }

static int px_get_cpuid2(int vcpu_fd, struct kvm_cpuid_entry2 *out, int max)
{ return px_cpuid_call(vcpu_fd, KVM_GET_CPUID2, out, max); }

static int px_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int n)
{
    size_t sz = sizeof(struct kvm_cpuid2) + (size_t)n * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, sz);
    int r;
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)n;
    memcpy(c->entries, entries, (size_t)n * sizeof(struct kvm_cpuid_entry2));
    r = px_ret(ioctl(vcpu_fd, KVM_SET_CPUID2, c));
    free(c);
    return r;
}

static int px_get_msr_index_list(int kvm_fd, uint32_t *out, int max)
{
    struct kvm_msr_list *l = calloc(1, sizeof(*l) + (size_t)max * sizeof(uint32_t));
    int r;
    if (!l) return -ENOMEM;
    l->nmsrs = (uint32_t)max;
    r = ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, l);
    if (r < 0) { r = -errno; free(l); return r; }
    memcpy(out, l->indices, l->nmsrs * sizeof(uint32_t));
    r = (int)l->nmsrs;
    free(l);
    return r;
}

/* KVM_GET/SET_MSRS answer how many entries they processed: the first failing one stops them. */
static struct kvm_msrs *px_msrs_new(const uint32_t *index, const uint64_t *value, int n)
{
    struct kvm_msrs *m = calloc(1, sizeof(*m) + (size_t)n * sizeof(struct kvm_msr_entry));
    int i;
    if (!m) return NULL;
    m->nmsrs = (uint32_t)n;
    for (i = 0; i < n; i++) {
        m->entries[i].index = index[i];
        m->entries[i].data = value ? value[i] : 0;
    }
    return m;
}

static int px_get_msrs(int vcpu_fd, const uint32_t *index, uint64_t *value, int n)
{
    struct kvm_msrs *m = px_msrs_new(index, NULL, n);
    int r, i;
    if (!m) return -ENOMEM;
    r = px_ret(ioctl(vcpu_fd, KVM_GET_MSRS, m));
    for (i = 0; r > 0 && i < r; i++) value[i] = m->entries[i].data;
    free(m);
    return r;
}

static int px_set_msrs(int vcpu_fd, const uint32_t *index, const uint64_t *value, int n)
{
    struct kvm_msrs *m = px_msrs_new(index, value, n);
    int r;
    if (!m) return -ENOMEM;
    r = px_ret(ioctl(vcpu_fd, KVM_SET_MSRS, m));
    free(m);
    return r;
}

/* The kick signal must interrupt KVM_RUN with EINTR and do nothing else: a C no-op handler
   without SA_RESTART. Python-level handlers run only in the main thread, so they cannot. */
static void px_kick_noop(int signo) { (void)signo; }

static int px_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = px_kick_noop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return px_ret(sigaction(signo, &sa, NULL));
}
"""

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source("adapters.kvm._kvm_cffi", _SOURCE)

if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run as a script
    from adapters._ffi_inplace import build_in_place

    build_in_place(ffibuilder, __file__, "_kvm_cffi")
