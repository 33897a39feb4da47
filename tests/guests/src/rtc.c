/* rtc: the CMOS clock's interrupts on IRQ 8, through the IOAPIC. In turn: the update-ended
 * interrupt (UIE) for `seconds` updates, the alarm (AIE) 2 s ahead with a don't-care hour,
 * then the periodic interrupt (PIE) at `rate` (register A's rate select, default 6 = 1024 Hz)
 * for one RTC second. The handler reads register C (which clears it) and counts its flags;
 * each phase prints its counts and the RTC seconds it took, then C is read twice to show it
 * clears. `ticks`: only UIE, a line per interrupt, for ever. The clock runs in binary, 24-hour
 * mode; every CMOS access is made with interrupts off (the handler uses the index port too). */
#include "lib.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define REG_SEC 0x00
#define REG_SEC_ALARM 0x01
#define REG_MIN 0x02
#define REG_MIN_ALARM 0x03
#define REG_HOUR 0x04
#define REG_HOUR_ALARM 0x05
#define REG_A 0x0a
#define REG_B 0x0b
#define REG_C 0x0c
#define A_UIP 0x80
#define B_PIE 0x40
#define B_AIE 0x20
#define B_UIE 0x10
#define B_BINARY_24H 0x06
#define C_IRQF 0x80
#define C_PF 0x40
#define C_AF 0x20
#define C_UF 0x10
#define ALARM_ANY 0xc0
#define RTC_IRQ 8
#define RTC_VECTOR 0x48

static volatile u32 irqs, pf, af, uf, spurious;

static u8 cmos_read(u8 reg)
{
    outb(CMOS_INDEX, reg);
    return inb(CMOS_DATA);
}

static void cmos_write(u8 reg, u8 v)
{
    outb(CMOS_INDEX, reg);
    outb(CMOS_DATA, v);
}

static void rtc_irq(void)
{
    u8 c = cmos_read(REG_C);
    irqs++;
    if (!(c & C_IRQF))
        spurious++;
    if (c & C_PF)
        pf++;
    if (c & C_AF)
        af++;
    if (c & C_UF)
        uf++;
}

static void reset_counts(void)
{
    irqs = pf = af = uf = spurious = 0;
}

/* Seconds since midnight, read outside an update cycle (interrupts off). */
static u32 rtc_tod(void)
{
    while (cmos_read(REG_A) & A_UIP)
        cpu_relax();
    return cmos_read(REG_HOUR) * 3600u + cmos_read(REG_MIN) * 60u + cmos_read(REG_SEC);
}

static u32 elapsed(u32 from, u32 to)
{
    return (to + 86400u - from) % 86400u;
}

/* Enable `b_bits` with C flushed first (as Linux's rtc-cmos does), interrupts off. */
static void enable(u8 b_bits)
{
    reset_counts();
    (void)cmos_read(REG_C);
    cmos_write(REG_B, B_BINARY_24H | b_bits);
}

static void disable(void)
{
    cmos_write(REG_B, B_BINARY_24H);
    (void)cmos_read(REG_C);
}

static void phase_uie(u32 n)
{
    irq_disable();
    enable(B_UIE);
    u32 t0 = rtc_tod();
    while (uf < n)
        irq_sleep();
    u32 t1 = rtc_tod();
    u32 got_uf = uf, got_irqs = irqs, got_spurious = spurious;
    disable();
    print("rtc: uie irqs=%u uf=%u spurious=%u elapsed=%u\n", got_irqs, got_uf, got_spurious, elapsed(t0, t1));
}

static void phase_aie(void)
{
    irq_disable();
    u32 t0 = rtc_tod(), at = (t0 + 2) % 86400u;
    cmos_write(REG_HOUR_ALARM, ALARM_ANY);
    cmos_write(REG_MIN_ALARM, (u8)(at / 60 % 60));
    cmos_write(REG_SEC_ALARM, (u8)(at % 60));
    enable(B_AIE);
    while (af < 1)
        irq_sleep();
    u32 t1 = rtc_tod();
    /* Three more seconds, polled with interrupts on: the alarm must not fire again. */
    while (elapsed(t1, rtc_tod()) < 3) {
        __asm__ __volatile__("sti; nop; nop; cli" ::: "memory");
    }
    u32 got_af = af, got_irqs = irqs, got_spurious = spurious;
    disable();
    print("rtc: aie irqs=%u af=%u spurious=%u after=%u\n", got_irqs, got_af, got_spurious, elapsed(t0, t1));
}

static void phase_pie(u8 rate)
{
    irq_disable();
    cmos_write(REG_A, (u8)(0x20 | rate));
    u32 start = rtc_tod();
    while (rtc_tod() == start)            /* from the turn of a second */
        cpu_relax();
    start = rtc_tod();
    enable(B_PIE);
    while (rtc_tod() == start)
        irq_sleep();
    u32 got_pf = pf, got_irqs = irqs, got_spurious = spurious;
    disable();
    print("rtc: pie rate=%u irqs=%u pf=%u spurious=%u\n", rate, got_irqs, got_pf, got_spurious);
}

/* `ticks`: UIE for ever, a line per update-ended interrupt (a migration test's heartbeat). */
static void ticks(void)
{
    irq_disable();
    enable(B_UIE);
    for (u32 seen = 0;; seen++) {
        while (uf == seen)
            irq_sleep();
        print("rtc: tick %u tod=%u\n", seen + 1, rtc_tod());
    }
}

int main(void)
{
    u32 seconds = (u32)arg_u64("seconds", 3);
    u8 rate = (u8)arg_u64("rate", 6);
    irq_disable();
    cmos_write(REG_B, B_BINARY_24H);
    irq_route(RTC_IRQ, RTC_VECTOR, rtc_irq);
    print("rtc: start\n");
    if (arg_flag("ticks"))
        ticks();
    phase_uie(seconds);
    phase_aie();
    phase_pie(rate);
    irq_disable();
    cmos_write(REG_A, 0x20);              /* rate 0: no PF may latch between the two reads */
    u8 c1 = cmos_read(REG_C), c2 = cmos_read(REG_C);
    print("rtc: c first=%x second=%x\n", c1, c2);
    print("rtc: done\n");
    return 0;
}
