/* Freestanding runtime of the test guests: port and MMIO access, COM1 output, the kernel
 * command line from boot_params, the e820 RAM size, i8042 reset. No libc. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define barrier() __asm__ __volatile__("" ::: "memory")
#define NORETURN __attribute__((noreturn))

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ __volatile__("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline void cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }

typedef struct { volatile u32 v; } spinlock_t;

static inline void spin_lock(spinlock_t *l)
{
    while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE))
        while (l->v)
            cpu_relax();
}

static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE); }

/* Physical layout the guests rely on (pystrato's microvm, domain/boot/layout.py). */
#define COM1 0x3f8
#define I8042_CMD 0x64
#define LAPIC_BASE 0xfee00000UL

extern u8 _image_start[], _image_end[];
extern const u8 *boot_params;

/* Common knobs: gate (wait for one byte on COM1 before main), exit=halt (stay up at the end
 * instead of the i8042 reset). */
void guest_start(const u8 *bp) NORETURN;
int main(void);                           /* each guest's body; its return value is ignored */

void putc(char c);
void print(const char *fmt, ...);          /* %s %c %d %u %x %lu %ld %lx %p, width and 0 flag;
                                              a whole call is one atomic line (spinlock) */
void vprint(const char *fmt, va_list ap);
void reset(void) NORETURN;                 /* i8042 0xfe: pystrato exits with guest-reset */
void halt(void) NORETURN;                  /* cli; hlt forever: the VM stays up for QMP */
void finish(void) NORETURN;                /* reset or halt, by the command line's exit= */

const char *cmdline(void);
const char *arg(const char *key, size_t *len);        /* value of key=..., or NULL */
int arg_flag(const char *key);                         /* bare `key`, or key=1/on/yes */
u64 arg_u64(const char *key, u64 dflt);                /* decimal or 0x hex */
int arg_eq(const char *key, const char *want);
u64 parse_u64(const char *s, size_t len, int *ok);
int virtio_mmio_slot(unsigned n, u64 *base, u32 *irq); /* n-th virtio_mmio.device= entry */
u64 ram_end_below_4g(void);                            /* end of the e820 RAM range holding 1 MiB */

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

void idt_load(void);                       /* APs share the BSP's IDT */

/* Device interrupts through the IOAPIC, one handler: the 8259s masked, the local APIC enabled,
 * IOAPIC pin `pin` edge-triggered, active high, to this CPU at `vector` (32..255), whose entry
 * saves the caller-saved registers, calls `fn` and sends the local APIC its EOI. Loads an IDT
 * of its own with the exception entries and this vector (idt_load() would drop the vector). */
void irq_route(u32 pin, u8 vector, void (*fn)(void));
/* The same routing with an entry stub of the caller's own (it must send the EOI and iretq):
 * for a guest whose handler must cost as few instructions as possible (virtio_blk's bench). */
void irq_install(u32 pin, u8 vector, const void *stub);
static inline void irq_disable(void) { __asm__ __volatile__("cli" ::: "memory"); }
/* Sleep until an interrupt was handled, interrupts off again after. Call it with them off, once
 * the condition waited for was seen false: sti holds them off for one more instruction, so one
 * that is already pending wakes the hlt instead of being taken before it. */
static inline void irq_sleep(void) { __asm__ __volatile__("sti; hlt; cli" ::: "memory"); }

/* Run fn(arg) in ring 3 (interrupts off; MMIO works, port I/O and print do not) over an
 * identity map of the first 4 GiB with user access; returns its result, back in ring 0. For
 * loops whose own speed is measured: kvm-pvm runs a guest's ring-0 code in its instruction
 * emulator but ring-3 code natively. */
u64 user_call(u64 (*fn)(void *), void *arg);
void user_setup(void);   /* what user_call's first call builds (page tables, TSS), done ahead */

#endif
