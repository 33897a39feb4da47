/* The runtime behind lib.h. */
#include "lib.h"

const u8 *boot_params;
static const char *cmd;
static spinlock_t print_lock;

#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_TABLE 0x2d0

/* --- memory and strings (gcc may emit calls to these even freestanding) --------------------- */

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    __asm__ __volatile__("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* --- COM1 ------------------------------------------------------------------------------------- */

void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))     /* LSR.THRE: the holding register is empty */
        cpu_relax();
    outb(COM1, (u8)c);
}

static void put_u64(u64 v, unsigned base, int width, char pad, int neg)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = v % base;
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg)
        buf[n++] = '-';
    for (int i = n; i < width; i++)
        putc(pad);
    while (n)
        putc(buf[--n]);
}

void vprint(const char *f, va_list ap)
{
    for (; *f; f++) {
        if (*f != '%') {
            putc(*f);
            continue;
        }
        f++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*f == '0')
            pad = '0', f++;
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        while (*f == 'l')
            lng = 1, f++;
        switch (*f) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            while (*s)
                putc(*s++);
            break;
        }
        case 'c':
            putc((char)va_arg(ap, int));
            break;
        case 'd': {
            long v = lng ? va_arg(ap, long) : va_arg(ap, int);
            put_u64(v < 0 ? -(u64)v : (u64)v, 10, width, pad, v < 0);
            break;
        }
        case 'u':
            put_u64(lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad, 0);
            break;
        case 'x':
            put_u64(lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad, 0);
            break;
        case 'p':
            putc('0'), putc('x');
            put_u64((u64)va_arg(ap, void *), 16, width, pad, 0);
            break;
        case '%':
            putc('%');
            break;
        default:
            putc('%'), putc(*f);
            if (!*f)
                return;
        }
    }
}

void print(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    spin_lock(&print_lock);
    vprint(fmt, ap);
    spin_unlock(&print_lock);
    va_end(ap);
}

/* --- ending ----------------------------------------------------------------------------------- */

void halt(void)
{
    for (;;)
        __asm__ __volatile__("cli; hlt");
}

void reset(void)
{
    outb(I8042_CMD, 0xfe);
    halt();
}

void finish(void)
{
    if (arg_eq("exit", "halt"))
        halt();
    reset();
}

/* --- command line ----------------------------------------------------------------------------- */

const char *cmdline(void) { return cmd ? cmd : ""; }

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* Finds `key` as a whole word, or `key=value`; returns the value (or "" for a bare word). */
static const char *find_arg(const char *key, size_t *len)
{
    size_t klen = strlen(key);
    const char *p = cmdline();
    while (*p) {
        while (is_space(*p))
            p++;
        const char *w = p;
        while (*p && !is_space(*p))
            p++;
        size_t wlen = (size_t)(p - w);
        if (wlen >= klen && memcmp(w, key, klen) == 0) {
            if (wlen == klen) {
                *len = 0;
                return w + wlen;
            }
            if (w[klen] == '=') {
                *len = wlen - klen - 1;
                return w + klen + 1;
            }
        }
    }
    return NULL;
}

const char *arg(const char *key, size_t *len)
{
    size_t n;
    const char *v = find_arg(key, &n);
    if (v && len)
        *len = n;
    return v;
}

int arg_eq(const char *key, const char *want)
{
    size_t n;
    const char *v = find_arg(key, &n);
    return v && n == strlen(want) && memcmp(v, want, n) == 0;
}

int arg_flag(const char *key)
{
    size_t n;
    const char *v = find_arg(key, &n);
    if (!v)
        return 0;
    return n == 0 || arg_eq(key, "1") || arg_eq(key, "on") || arg_eq(key, "yes");
}

u64 parse_u64(const char *s, size_t len, int *ok)
{
    u64 v = 0;
    unsigned base = 10;
    size_t i = 0;
    if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, i = 2;
    *ok = i < len;
    for (; i < len; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else if (c == 'K' || c == 'M' || c == 'G') {   /* size suffixes, as in 4K@... */
            v <<= c == 'K' ? 10 : c == 'M' ? 20 : 30;
            *ok = *ok && i + 1 == len;
            return v;
        } else {
            *ok = 0;
            return v;
        }
        v = v * base + d;
    }
    return v;
}

u64 arg_u64(const char *key, u64 dflt)
{
    size_t n;
    int ok;
    const char *v = find_arg(key, &n);
    if (!v)
        return dflt;
    u64 r = parse_u64(v, n, &ok);
    if (!ok) {
        print("guest: bad number in %s=\n", key);
        return dflt;
    }
    return r;
}

/* virtio_mmio.device=<size>@<base>:<irq> entries, in command-line order. */
int virtio_mmio_slot(unsigned n, u64 *base, u32 *irq)
{
    static const char key[] = "virtio_mmio.device=";
    const char *p = cmdline();
    unsigned seen = 0;
    while (*p) {
        while (is_space(*p))
            p++;
        const char *w = p;
        while (*p && !is_space(*p))
            p++;
        if ((size_t)(p - w) <= sizeof key - 1 || memcmp(w, key, sizeof key - 1))
            continue;
        if (seen++ != n)
            continue;
        const char *at = w + sizeof key - 1, *end = p, *colon;
        while (at < end && *at != '@')
            at++;
        for (colon = at; colon < end && *colon != ':'; colon++)
            ;
        int ok1, ok2;
        if (at >= end || colon >= end)
            return 0;
        *base = parse_u64(at + 1, (size_t)(colon - at - 1), &ok1);
        *irq = (u32)parse_u64(colon + 1, (size_t)(end - colon - 1), &ok2);
        return ok1 && ok2;
    }
    return 0;
}

u64 ram_end_below_4g(void)
{
    unsigned n = boot_params[BP_E820_ENTRIES];
    for (unsigned i = 0; i < n && i < 128; i++) {
        const u8 *e = boot_params + BP_E820_TABLE + 20 * i;
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        u32 type = *(const u32 *)(e + 16);
        if (type == 1 && addr <= 0x100000 && 0x100000 < addr + size)
            return addr + size;
    }
    return 0;
}

/* --- exceptions ------------------------------------------------------------------------------- */

struct idt_entry {
    u16 off0, sel, flags, off1;
    u32 off2, zero;
} __attribute__((packed));

static struct idt_entry idt[32] __attribute__((aligned(16)));
extern const u64 exc_stubs[32];

void idt_load(void)
{
    struct { u16 limit; u64 base; } __attribute__((packed)) ptr = { sizeof idt - 1, (u64)idt };
    __asm__ __volatile__("lidt %0" :: "m"(ptr));
}

static void idt_init(void)
{
    for (int i = 0; i < 32; i++) {
        u64 a = exc_stubs[i];
        idt[i] = (struct idt_entry){ (u16)a, 0x08, 0x8e00, (u16)(a >> 16), (u32)(a >> 32), 0 };
    }
    idt_load();
}

void exc_report(u64 vec, u64 err, u64 rip) NORETURN;
void exc_report(u64 vec, u64 err, u64 rip)
{
    print_lock.v = 0;   /* the fault may have hit inside print */
    print("guest: EXCEPTION vector=%lu error=%lx rip=%lx\n", vec, err, rip);
    finish();
}

/* --- device interrupts (irq_route) ------------------------------------------------------------- */

#define IOAPIC_BASE 0xfec00000UL
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_SVR 0xf0

static struct idt_entry irq_idt[256] __attribute__((aligned(16)));
void (*irq_fn)(void);
extern char irq_stub[];
/* The CPU entered with RSP 16-byte aligned before its 5-word frame: nine pushes realign it for
 * the call. -mno-red-zone keeps the interrupted code's stack below RSP safe. */
__asm__(".text\n"
        "irq_stub:\n"
        "    push %rax\n    push %rcx\n    push %rdx\n    push %rsi\n    push %rdi\n"
        "    push %r8\n    push %r9\n    push %r10\n    push %r11\n"
        "    call *irq_fn(%rip)\n"
        "    mov $0xfee000b0, %eax\n"     /* local APIC EOI register */
        "    movl $0, (%rax)\n"
        "    pop %r11\n    pop %r10\n    pop %r9\n    pop %r8\n"
        "    pop %rdi\n    pop %rsi\n    pop %rdx\n    pop %rcx\n    pop %rax\n"
        "    iretq\n");

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}

void irq_install(u32 pin, u8 vector, const void *stub)
{
    memcpy(irq_idt, idt, sizeof idt);
    u64 a = (u64)stub;
    irq_idt[vector] = (struct idt_entry){ (u16)a, 0x08, 0x8e00, (u16)(a >> 16), (u32)(a >> 32), 0 };
    struct { u16 limit; u64 base; } __attribute__((packed)) ptr = { sizeof irq_idt - 1, (u64)irq_idt };
    __asm__ __volatile__("lidt %0" :: "m"(ptr));
    outb(0x21, 0xff);                                  /* 8259s masked: only the IOAPIC */
    outb(0xa1, 0xff);
    mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x1ff);       /* software-enable the local APIC */
    mmio_write32(LAPIC_BASE + LAPIC_TPR, 0);
    u32 apic = mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
    ioapic_write(0x11 + 2 * pin, apic << 24);
    ioapic_write(0x10 + 2 * pin, vector);              /* fixed, physical, active high, edge, unmasked */
}

void irq_route(u32 pin, u8 vector, void (*fn)(void))
{
    irq_fn = fn;
    irq_install(pin, vector, irq_stub);
}

/* --- ring 3 (user_call) ----------------------------------------------------------------------- */

/* kvm-pvm runs this guest's ring-0 code through its instruction emulator but its ring-3 code
 * natively (a two-instruction loop: ~1.5 us per iteration in ring 0, ~4 ns in ring 3, measured
 * here), so a driver loop whose speed a benchmark measures runs in user mode, as a user-space
 * polled driver (SPDK's virtio) does. The way back is `int3` through a gate opened to ring 3
 * for the call, onto the stack that TSS.rsp0 names. No port I/O in ring 3: kvm-pvm raised #GP
 * for an `in` there even with IOPL 3 in the iretq frame. */
#define TSS_SEL 0x28   /* start.S's GDT: 0x18 ring-3 data, 0x20 ring-3 code, 0x28 this TSS */

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
    u16 reserved3, iomap_base;
} __attribute__((packed));

struct tss64 user_tss __attribute__((aligned(16)));
u64 user_kernel_rsp;
extern u64 guest_gdt[];
extern char user_return[];
u64 user_enter(u64 (*fn)(void *), void *arg, u64 user_rsp);

static u64 user_pml4[512] __attribute__((aligned(4096)));
static u64 user_pdpt[512] __attribute__((aligned(4096)));
static u64 user_pd[4][512] __attribute__((aligned(4096)));
static u8 user_stack[16384] __attribute__((aligned(16)));

/* user_enter(fn, arg, user_rsp): save the callee-saved registers and the kernel stack, iretq to
 * ring 3 (IF 0) on user_rsp, call fn(arg) there, then int3 back to user_return. */
__asm__(".text\n"
        ".globl user_enter, user_return\n"
        "user_enter:\n"
        "    push %rbx\n    push %rbp\n    push %r12\n    push %r13\n    push %r14\n    push %r15\n"
        "    mov %rsp, user_kernel_rsp(%rip)\n"
        "    mov %rsp, %rax\n"
        "    and $-16, %rax\n"
        "    mov %rax, user_tss+4(%rip)\n"     /* rsp0: the int3 frame lands below the saved registers */
        "    pushq $0x1b\n"                     /* SS: ring-3 data */
        "    pushq %rdx\n"                      /* RSP */
        "    pushq $0x2\n"                      /* RFLAGS: IF 0 */
        "    pushq $0x23\n"                     /* CS: ring-3 64-bit code */
        "    lea 1f(%rip), %rax\n"
        "    pushq %rax\n"
        "    iretq\n"
        "1:  mov %rdi, %rax\n"
        "    mov %rsi, %rdi\n"
        "    call *%rax\n"
        "    int3\n"
        "user_return:\n"                        /* ring 0 again; rax holds fn's result */
        "    mov user_kernel_rsp(%rip), %rsp\n"
        "    mov $0x10, %ecx\n"
        "    mov %ecx, %ds\n    mov %ecx, %es\n    mov %ecx, %fs\n    mov %ecx, %gs\n    mov %ecx, %ss\n"
        "    pop %r15\n    pop %r14\n    pop %r13\n    pop %r12\n    pop %rbp\n    pop %rbx\n"
        "    ret\n");

void user_setup(void)
{
    static int ready;
    if (ready)
        return;
    user_pml4[0] = (u64)user_pdpt | 0x7;                    /* present, writable, user */
    for (u64 g = 0; g < 4; g++) {
        user_pdpt[g] = (u64)user_pd[g] | 0x7;
        for (u64 i = 0; i < 512; i++)
            user_pd[g][i] = (g << 30 | i << 21) | 0x87;    /* 2 MiB pages, user */
    }
    u64 base = (u64)&user_tss, limit = sizeof user_tss - 1;
    user_tss.iomap_base = sizeof user_tss;                  /* no I/O bitmap: IOPL decides */
    guest_gdt[TSS_SEL / 8] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ULL << 40
                             | ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
    guest_gdt[TSS_SEL / 8 + 1] = base >> 32;
    __asm__ __volatile__("ltr %w0" :: "r"(TSS_SEL));
    ready = 1;
}

u64 user_call(u64 (*fn)(void *), void *arg)
{
    user_setup();
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr;
    __asm__ __volatile__("sidt %0" : "=m"(idtr));
    struct idt_entry *gate = (struct idt_entry *)idtr.base + 3, saved = *gate;
    u64 a = (u64)user_return;
    *gate = (struct idt_entry){ (u16)a, 0x08, 0xee00, (u16)(a >> 16), (u32)(a >> 32), 0 };   /* DPL 3 */
    u64 cr3;
    __asm__ __volatile__("mov %%cr3, %0" : "=r"(cr3));
    __asm__ __volatile__("mov %0, %%cr3" :: "r"((u64)user_pml4) : "memory");
    u64 r = user_enter(fn, arg, (u64)(user_stack + sizeof user_stack));
    __asm__ __volatile__("mov %0, %%cr3" :: "r"(cr3) : "memory");
    *gate = saved;
    return r;
}

/* --- entry ------------------------------------------------------------------------------------ */

void guest_start(const u8 *bp)
{
    boot_params = bp;
    u64 ptr = *(const u32 *)(bp + BP_CMD_LINE_PTR) | (u64)*(const u32 *)(bp + BP_EXT_CMD_LINE_PTR) << 32;
    cmd = ptr ? (const char *)ptr : "";
    idt_init();
    if (arg_flag("gate")) {                  /* wait for one byte on COM1: the host is ready */
        while (!(inb(COM1 + 5) & 0x01))     /* LSR.DR */
            cpu_relax();
        (void)inb(COM1);
    }
    main();
    finish();
}
