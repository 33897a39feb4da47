/* virtio_blk: a minimal virtio-blk driver over virtio-mmio v2 (polling, interrupts suppressed,
 * one split queue).
 *
 * Default: write `count` sectors (default 256) from `sector` (default 0) with a pattern of
 * `seed` (byte i of sector s is (s * 131 + i * 7 + seed) & 0xff), FLUSH, read them back and
 * compare, printing the status byte of every step. `ro`: the device is expected to be read-only:
 * read first, then try one write and print the status the device returned (virtio 1.1 §5.2.6:
 * VIRTIO_BLK_S_IOERR for a write to a VIRTIO_BLK_F_RO device). `bench=read|write`: `total`
 * bytes in requests of `bs` bytes, `depth` requests in flight, timed between two lines
 * (`wait=irq|poll`; `ring=3` runs the request loop in user mode, with wait=poll).
 * The device is the slot=N-th virtio_mmio.device= entry of the command line (default 0). */
#include "virtio.h"

#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define SECTOR 512
#define MAX_BYTES (1u << 20)          /* pattern mode: at most 2048 sectors */
#define DEPTH_MAX 16
#define BS_MAX (256u << 10)
#define TIMEOUT (20ULL << 30)          /* cycles: several seconds on any host */

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};

static struct vdev dev;
static struct blk_hdr hdrs[DEPTH_MAX];
static volatile u8 statuses[DEPTH_MAX];
static u8 wbuf[MAX_BYTES] __attribute__((aligned(4096)));
static u8 rbuf[MAX_BYTES] __attribute__((aligned(4096)));
static u8 bench_buf[DEPTH_MAX][BS_MAX] __attribute__((aligned(4096)));

/* Fill slot's three descriptors (header, data, status) for one request; returns its head. */
static u16 prepare(unsigned slot, u32 type, u64 sector, void *buf, u32 len)
{
    u16 h = (u16)(slot * 3);
    hdrs[slot] = (struct blk_hdr){ type, 0, sector };
    statuses[slot] = 0xff;
    struct virtq_desc *d = dev.desc;
    d[h] = (struct virtq_desc){ (u64)&hdrs[slot], sizeof hdrs[slot], VIRTQ_DESC_F_NEXT, (u16)(h + 1) };
    if (len) {
        d[h + 1] = (struct virtq_desc){ (u64)buf, len,
                                        (u16)(VIRTQ_DESC_F_NEXT | (type == T_IN ? VIRTQ_DESC_F_WRITE : 0)),
                                        (u16)(h + 2) };
        d[h + 2] = (struct virtq_desc){ (u64)&statuses[slot], 1, VIRTQ_DESC_F_WRITE, 0 };
    } else {
        d[h].next = (u16)(h + 2);
        d[h + 2] = (struct virtq_desc){ (u64)&statuses[slot], 1, VIRTQ_DESC_F_WRITE, 0 };
    }
    return h;
}

/* With VIRTIO_RING_F_EVENT_IDX (bench wait=irq): the device's avail_event and the driver's
 * used_event sit right after the rings. */
#define F_EVENT_IDX (1ULL << 29)
#define AVAIL_EVENT() (*(volatile u16 *)((u8 *)dev.used + 4 + 8 * (u64)dev.qsize))
#define USED_EVENT() (*(volatile u16 *)((u8 *)dev.avail + 4 + 2 * (u64)dev.qsize))

/* Notify unless the device asked not to be: VRING_USED_F_NO_NOTIFY while it is processing, or
 * with EVENT_IDX, unless the avail index just passed the device's avail_event (virtio 1.1
 * §2.6.7.2; `old` is the avail index before this batch). */
static void kick_since(u16 old)
{
    __asm__ __volatile__("mfence" ::: "memory");   /* avail idx store before the flags/event load */
    if (dev.features & F_EVENT_IDX) {
        u16 now = dev.avail->idx;
        if ((u16)(now - AVAIL_EVENT() - 1) < (u16)(now - old))
            vq_notify(&dev);
    } else if (!(((volatile struct virtq_used *)dev.used)->flags & VRING_USED_F_NO_NOTIFY)) {
        vq_notify(&dev);
    }
}

static void kick(void) { kick_since((u16)(dev.avail->idx - 1)); }

/* One synchronous request; returns the status byte, or 0x100 + the wait outcome. */
static unsigned request(u32 type, u64 sector, void *buf, u32 len)
{
    u32 id, used_len;
    vq_push(&dev, prepare(0, type, sector, buf, len));
    kick();
    int w = vq_wait(&dev, &id, &used_len, TIMEOUT);
    if (w != WAIT_DONE)
        return 0x100 + (unsigned)w;
    return statuses[0];
}

static u8 pattern(u64 sector, unsigned i, u64 seed) { return (u8)(sector * 131 + i * 7 + seed); }

static unsigned rw(u32 type, u64 sector, u8 *buf, u64 count, u64 chunk)
{
    unsigned worst = 0;
    for (u64 s = 0; s < count; s += chunk) {
        u64 n = count - s < chunk ? count - s : chunk;
        unsigned st = request(type, sector + s, buf + s * SECTOR, (u32)(n * SECTOR));
        if (st && !worst)
            worst = st;
    }
    return worst;
}

/* wait=irq: sleep in hlt until the device's used-buffer interrupt (IOAPIC pin = the slot's IRQ,
 * edge, to the BSP at IRQ_VECTOR; the handler only sends the local APIC its EOI), as a guest
 * kernel waiting for a disk does. The wait loop re-checks the ring with interrupts off and
 * sleeps with `sti; hlt` (sti holds interrupts off for one more instruction, so an interrupt
 * that is already pending wakes the hlt instead of being taken before it). */
#define IRQ_VECTOR 0x40

extern char blk_irq_stub[];
__asm__(".text\n"
        "blk_irq_stub:\n"
        "    push %rax\n"
        "    mov $0xfee000b0, %eax\n"      /* local APIC EOI register */
        "    movl $0, (%rax)\n"
        "    pop %rax\n"
        "    iretq\n");

/* Sleep until the used index moves past `last`; 1 if the device needs a reset instead (it then
 * raises a config interrupt: Status is read only after a wake-up that brought no used entry). */
static int irq_wait(volatile struct virtq_used *used, u16 last)
{
    for (int woke = 0;; woke = 1) {
        __asm__ __volatile__("cli" ::: "memory");
        if (used->idx != last)
            return 0;
        if (dev.features & F_EVENT_IDX) {
            /* Interrupt on the next used entry only: while this driver is awake and reaping,
             * completions raise none (Linux's virtqueue_enable_cb with EVENT_IDX). */
            USED_EVENT() = last;
            __asm__ __volatile__("mfence" ::: "memory");
            if (used->idx != last)
                return 0;
        }
        if (woke && (vread(&dev, VM_STATUS) & S_NEEDS_RESET))
            return 1;
        __asm__ __volatile__("sti; hlt" ::: "memory");
    }
}

struct bench_run {
    u32 type;
    int irq;
    u64 bs, nreq, sectors, end, depth;
    u64 done, errors, tsc;   /* out */
};

/* The request loop between the start and done lines (ring 0, or ring 3 via user_call: it prints
 * nothing, COM1 is port I/O). 1 if the device stopped answering. */
static u64 bench_loop(void *arg)
{
    struct bench_run *b = arg;
    u64 next = 0, done = 0, errors = 0, sector = 0, nreq = b->nreq;
    volatile struct virtq_used *used = (volatile struct virtq_used *)dev.used;
    struct virtq_avail *avail = dev.avail;
    u16 qmask = (u16)(dev.qsize - 1), avail_idx = dev.avail_idx, last_used = dev.last_used;
    u64 t0 = rdtsc();
    for (; next < nreq && next < b->depth; next++) {
        hdrs[next].sector = sector;
        statuses[next] = 0xff;
        sector += b->sectors;
        if (sector >= b->end)
            sector = 0;
        avail->ring[avail_idx++ & qmask] = (u16)(next * 3);
    }
    barrier();
    avail->idx = avail_idx;
    kick_since(dev.avail_idx);
    while (done < nreq) {
        if (used->idx == last_used) {
            u32 id, len;   /* vq_wait consumes dev.last_used's entry; the pass below reads it again */
            dev.avail_idx = avail_idx;
            dev.last_used = last_used;
            if (b->irq ? irq_wait(used, last_used) : vq_wait(&dev, &id, &len, TIMEOUT) != WAIT_DONE) {
                b->done = done;
                return 1;
            }
        }
        u16 seen = used->idx;
        barrier();
        u16 posted = avail_idx;
        for (; last_used != seen; last_used++) {
            unsigned slot = used->ring[last_used & qmask].id / 3;
            if (statuses[slot] != 0)
                errors++;
            done++;
            if (next < nreq) {
                hdrs[slot].sector = sector;
                statuses[slot] = 0xff;
                sector += b->sectors;
                if (sector >= b->end)
                    sector = 0;
                avail->ring[avail_idx++ & qmask] = (u16)(slot * 3);
                next++;
            }
        }
        if (avail_idx != posted) {
            barrier();
            avail->idx = avail_idx;
            kick_since(posted);
        }
    }
    u64 t1 = rdtsc();
    dev.avail_idx = avail_idx;
    dev.last_used = last_used;
    b->done = done;
    b->errors = errors;
    b->tsc = t1 - t0;
    return 0;
}

/* Benchmark, written as a lean polled driver is (the guest's ring-0 code may run in the
 * hypervisor's instruction emulator, at microseconds per instruction, so every instruction per
 * request shows): each slot's three descriptors are built once and only the header's sector
 * changes; every completion the used ring holds is reaped in one pass, its slot reposted, and
 * the new avail index published with at most one notify per pass (Linux's blk-mq likewise
 * reaps all used entries per interrupt and kicks once per batch). ring=3 (with wait=poll) runs
 * the loop in user mode, where kvm-pvm does not emulate it: then the guest's own work per
 * request is next to nothing and the figure is the device path's. */
static int bench(u64 capacity, u32 irqno)
{
    struct bench_run b = { arg_eq("bench", "read") ? T_IN : T_OUT, arg_eq("wait", "irq"),
                           arg_u64("bs", 65536), 0, 0, 0, arg_u64("depth", 1), 0, 0, 0 };
    u64 total = arg_u64("total", 64ULL << 20), ring = arg_u64("ring", 0);
    if (!b.bs || b.bs % SECTOR || b.bs > BS_MAX || !b.depth || b.depth > DEPTH_MAX || b.depth * 3 > dev.qsize
        || b.bs / SECTOR > capacity || (ring != 0 && ring != 3) || (ring == 3 && b.irq)) {
        print("bench: bad parameters\n");
        return 1;
    }
    b.nreq = total / b.bs;
    b.sectors = b.bs / SECTOR;
    b.end = capacity - capacity % b.sectors;
    for (unsigned i = 0; i < b.depth; i++) {
        memset(bench_buf[i], 0x5a + i, b.bs);
        prepare(i, b.type, 0, bench_buf[i], (u32)b.bs);
    }
    if (b.irq) {
        irq_install(irqno, IRQ_VECTOR, blk_irq_stub);
        dev.avail->flags = 0;   /* used-buffer interrupts wanted */
    }
    if (ring == 3) {
        user_setup();   /* ring-0 work (emulated on kvm-pvm): not between the timed lines */
        vq_check_every = 1 << 22;   /* ~the same Status reads per second as ring 0's 4096 */
    }
    print("bench: start op=%s bs=%lu total=%lu depth=%lu wait=%s ring=%lu\n", b.type == T_IN ? "read" : "write",
          b.bs, b.nreq * b.bs, b.depth, b.irq ? "irq" : "poll", ring);
    if (ring == 3 ? user_call(bench_loop, &b) : bench_loop(&b)) {
        print("bench: device stopped answering after %lu requests\n", b.done);
        return 1;
    }
    print("bench: done bytes=%lu errors=%lu tsc=%lu\n", b.done * b.bs, b.errors, b.tsc);
    return 0;
}

int main(void)
{
    u64 base;
    u32 irq;
    unsigned slot = (unsigned)arg_u64("slot", 0);
    if (!virtio_mmio_slot(slot, &base, &irq)) {
        print("virtio_blk: no virtio_mmio.device entry %u on the command line\n", slot);
        return 1;
    }
    u64 want = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO;
    if (arg("bench", NULL) && arg_eq("wait", "irq"))
        want |= F_EVENT_IDX;   /* as Linux negotiates it: interrupts and notifies by index */
    if (vdev_init(&dev, base, VIRTIO_ID_BLOCK, want, QMAX))
        return 1;
    /* This driver polls the used ring with interrupts off (IF=0): it asks for no used-buffer
     * interrupts, as Linux does for its polled queues (virtqueue_disable_cb); bench wait=irq
     * turns them back on. */
    dev.avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    u64 capacity = mmio_read32(base + VM_CONFIG) | (u64)mmio_read32(base + VM_CONFIG + 4) << 32;
    int ro = (dev.features & VIRTIO_BLK_F_RO) != 0;
    print("virtio_blk: slot %u at %lx irq %u capacity=%lu features=%lx ro=%d queue=%u\n", slot, base, irq,
          capacity, dev.features, ro, dev.qsize);
    if (arg("bench", NULL))
        return bench(capacity, irq);

    u64 sector = arg_u64("sector", 0), count = arg_u64("count", 256), seed = arg_u64("seed", 1);
    u64 chunk = arg_u64("chunk", 128);
    if (!count || count * SECTOR > MAX_BYTES || !chunk || chunk * SECTOR > MAX_BYTES || sector + count > capacity) {
        print("virtio_blk: bad sector/count/chunk\n");
        return 1;
    }
    for (u64 s = 0; s < count; s++)
        for (unsigned i = 0; i < SECTOR; i++)
            wbuf[s * SECTOR + i] = pattern(sector + s, i, seed);

    if (arg_flag("ro")) {
        unsigned st = rw(T_IN, sector, rbuf, count, chunk);
        print("virtio_blk: read sector=%lu count=%lu status=%u\n", sector, count, st);
        st = request(T_OUT, sector, wbuf, SECTOR);
        print("virtio_blk: write sector=%lu count=1 status=%u\n", sector, st);
        u8 before[SECTOR];
        memcpy(before, rbuf, SECTOR);
        st = request(T_IN, sector, rbuf, SECTOR);
        print("virtio_blk: reread status=%u unchanged=%s\n", st, memcmp(before, rbuf, SECTOR) ? "no" : "yes");
        print("virtio_blk: done\n");
        return 0;
    }
    unsigned st = rw(T_OUT, sector, wbuf, count, chunk);
    print("virtio_blk: write sector=%lu count=%lu status=%u\n", sector, count, st);
    st = (dev.features & VIRTIO_BLK_F_FLUSH) ? request(T_FLUSH, 0, NULL, 0) : 0x1ff;
    print("virtio_blk: flush status=%u\n", st);
    memset(rbuf, 0, count * SECTOR);
    st = rw(T_IN, sector, rbuf, count, chunk);
    print("virtio_blk: read sector=%lu count=%lu status=%u\n", sector, count, st);
    for (u64 i = 0; i < count * SECTOR; i++)
        if (rbuf[i] != wbuf[i]) {
            print("virtio_blk: compare mismatch at byte %lu\n", i);
            print("virtio_blk: done\n");
            return 1;
        }
    print("virtio_blk: compare ok\n");
    print("virtio_blk: done\n");
    return 0;
}
