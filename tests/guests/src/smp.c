/* smp: the BSP starts every other CPU with INIT-SIPI-SIPI through its xAPIC (MMIO ICR); each CPU
 * prints its APIC id (CPUID.1:EBX[31:24]) under the print spinlock; the BSP then prints the done
 * line and resets. The CPUs come from the MP table, or cpus=N (APIC ids 0..N-1). */
#include "lib.h"

#define TRAMPOLINE 0x10000UL               /* SIPI vector 0x10: page below 1 MiB, free in microvm */
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_BUSY (1u << 12)
#define ICR_INIT 0x00004500u               /* INIT, level assert */
#define ICR_SIPI 0x00004600u               /* start-up, level assert */

/* Shared with smp_tramp.S (AP_MAX and AP_STACK_SIZE are passed to the assembler too). */
u8 ap_stacks[AP_MAX + 1][AP_STACK_SIZE] __attribute__((aligned(16)));
volatile u32 ap_stack_next;
extern u8 trampoline_start[], trampoline_end[], tramp_gdtr[], tramp_cr3[];
extern u8 guest_gdt[];

static volatile u32 cpus_up = 1;
static volatile u32 cpus_printed;

static u32 apic_id(void)
{
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    return b >> 24;
}

static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }
static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }

static void report(const char *who)
{
    print("smp: %s cpu apic_id=%u lapic_id=%u\n", who, apic_id(), lapic_read(LAPIC_ID) >> 24);
    __atomic_add_fetch(&cpus_printed, 1, __ATOMIC_SEQ_CST);
}

void ap_main(void);
void ap_main(void)
{
    idt_load();
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_SEQ_CST);
    report("ap");
}

static void spin_cycles(u64 n)
{
    u64 t = rdtsc();
    while (rdtsc() - t < n)
        cpu_relax();
}

static void ipi(u32 dest, u32 icr)
{
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, icr);
    for (int i = 0; i < 1000000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
}

/* Enabled processors of the MP table (Intel MP spec 1.4): their APIC ids, the BSP's flagged. */
static int mptable_cpus(u32 *ids, int max, u32 *bsp)
{
    static const u64 ranges[][2] = { { 0x9fc00, 0xa0000 }, { 0xf0000, 0x100000 } };
    for (unsigned r = 0; r < 2; r++)
        for (u64 a = ranges[r][0]; a < ranges[r][1]; a += 16) {
            const u8 *mpf = (const u8 *)a;
            if (memcmp(mpf, "_MP_", 4))
                continue;
            const u8 *t = (const u8 *)(u64)*(const u32 *)(mpf + 4);
            if (!t || memcmp(t, "PCMP", 4))
                return -1;
            u16 count = *(const u16 *)(t + 0x22);
            const u8 *e = t + 0x2c, *end = t + *(const u16 *)(t + 4);
            int n = 0;
            for (u16 i = 0; i < count && e < end; i++) {
                if (e[0] != 0) {
                    e += 8;
                    continue;
                }
                if (e[3] & 1 && n < max)
                    ids[n++] = e[1];
                if (e[3] & 2)
                    *bsp = e[1];
                e += 20;
            }
            return n;
        }
    return -1;
}

int main(void)
{
    u32 ids[AP_MAX + 1], bsp = apic_id();
    int n;
    u64 want = arg_u64("cpus", 0);
    if (want) {
        n = want > AP_MAX + 1 ? AP_MAX + 1 : (int)want;
        for (int i = 0; i < n; i++)
            ids[i] = (u32)i;
        print("smp: %d cpus from the command line\n", n);
    } else {
        n = mptable_cpus(ids, AP_MAX + 1, &bsp);
        if (n <= 0) {
            print("smp: no MP table\n");
            return 1;
        }
        print("smp: %d cpus from the MP table\n", n);
    }
    lapic_write(LAPIC_SVR, 0x1ff);                   /* software-enable the local APIC */

    u64 cr3;
    __asm__ __volatile__("mov %%cr3, %0" : "=r"(cr3));
    memcpy((void *)TRAMPOLINE, trampoline_start, (size_t)(trampoline_end - trampoline_start));
    u8 *gdtr = (u8 *)TRAMPOLINE + (tramp_gdtr - trampoline_start);
    *(u16 *)gdtr = 3 * 8 - 1;
    *(u32 *)(gdtr + 2) = (u32)(u64)guest_gdt;
    *(u32 *)((u8 *)TRAMPOLINE + (tramp_cr3 - trampoline_start)) = (u32)cr3;
    barrier();

    report("bsp");
    for (int i = 0; i < n; i++) {
        if (ids[i] == bsp)
            continue;
        u32 before = cpus_up;
        ipi(ids[i], ICR_INIT);
        spin_cycles(1000000);
        for (int s = 0; s < 2 && cpus_up == before; s++) {
            ipi(ids[i], ICR_SIPI | (TRAMPOLINE >> 12));
            spin_cycles(2000000);
        }
        u64 t = rdtsc();
        while (cpus_up == before && rdtsc() - t < 20000000000ULL)
            cpu_relax();
        if (cpus_up == before)
            print("smp: apic_id=%u did not start\n", ids[i]);
    }
    u64 t = rdtsc();
    while (cpus_printed < cpus_up && rdtsc() - t < 20000000000ULL)
        cpu_relax();
    print("smp: done, %u of %d cpus up\n", cpus_up, n);
    return 0;
}
