/* hostile: a virtio-blk driver that breaks the rules on purpose, one case at a time.
 *
 * It owns guest RAM below OWNED_END (image, rings, buffers, boot data) and fills the first
 * CANARY_SIZE bytes above it and the last CANARY_SIZE bytes of RAM with a canary (each 64-bit
 * word of page P is P ^ CANARY_KEY); it never touches the RAM between them, which stays zero.
 * Bad requests point their buffers into the canary: a device that writes before it has validated
 * the whole chain shows up there (the host can check every byte outside the driver's pages).
 * Only the canary is written because first touches of guest pages are slow on shadow paging.
 *
 * Each case prints "hostile: case NAME result=..." with result one of
 *   needs_reset status=0x..       the device set DEVICE_NEEDS_RESET (virtio 1.1 §2.1.2)
 *   done blk_status=N used_len=L  the request completed (blk_status 255: not written)
 *   timeout
 * then resets the device, re-initialises it and does one good read: "... recovered=yes|no".
 * Then it pokes unassigned MMIO and port I/O ("hostile: unassigned ... value=0x..") and
 * prints "hostile: done cases=N". The device is the slot=N-th virtio_mmio.device entry. */
#include "virtio.h"

#define OWNED_END 0x800000UL
#define CANARY_KEY 0xc0ffee5a00000000ULL
#define CANARY_SIZE 0x100000UL
#define T_IN 0
#define T_OUT 1
#define TIMEOUT (8ULL << 30)
#define QSIZE 128                       /* room for the 67-descriptor chain below */

struct blk_hdr {
    u32 type, reserved;
    u64 sector;
};

static struct vdev dev;
static u64 base, ram_end, capacity;
static struct blk_hdr hdr;
static volatile u8 status_byte;
static u8 buf[4096] __attribute__((aligned(4096)));
static struct virtq_desc itable[QMAX + 2] __attribute__((aligned(16)));
static int ncases, nfail;

static void desc(u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
    dev.desc[i] = (struct virtq_desc){ addr, len, flags, next };
}

/* The usual request head: header (readable) -> ... */
static void header(u32 type, u64 sector, u16 next)
{
    hdr = (struct blk_hdr){ type, 0, sector };
    desc(0, (u64)&hdr, sizeof hdr, VIRTQ_DESC_F_NEXT, next);
}

enum { R_DONE, R_NEEDS_RESET, R_TIMEOUT };
struct result {
    int kind;
    u32 used_len;
};

static struct result wait_result(void)
{
    u32 id, len = 0;
    int w = vq_wait(&dev, &id, &len, TIMEOUT);
    if (w == WAIT_DONE)
        return (struct result){ R_DONE, len };
    if (w == WAIT_NEEDS_RESET)
        return (struct result){ R_NEEDS_RESET, 0 };
    return (struct result){ R_TIMEOUT, 0 };
}

static struct result submit(u16 head)
{
    status_byte = 0xff;
    vq_push(&dev, head);
    vq_notify(&dev);
    return wait_result();
}

static int device_up(void)
{
    return vdev_init(&dev, base, VIRTIO_ID_BLOCK, F_INDIRECT_DESC, QSIZE) == 0;
}

/* One good request: read sector 0 into an owned buffer. */
static int good_request(void)
{
    header(T_IN, 0, 1);
    desc(1, (u64)buf, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    desc(2, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    struct result r = submit(0);
    return r.kind == R_DONE && status_byte == 0 && r.used_len == 513;
}

static void run_case(const char *name, struct result (*fn)(void))
{
    ncases++;
    if (!device_up()) {
        print("hostile: case %s result=setup_failed\n", name);
        nfail++;
        return;
    }
    struct result r = fn();
    u32 st = vread(&dev, VM_STATUS);
    if (r.kind == R_NEEDS_RESET || (r.kind == R_TIMEOUT && (st & S_NEEDS_RESET)))
        print("hostile: case %s result=needs_reset status=0x%x\n", name, st);
    else if (r.kind == R_DONE)
        print("hostile: case %s result=done blk_status=%u used_len=%u status=0x%x\n", name, status_byte,
              r.used_len, st);
    else
        print("hostile: case %s result=timeout status=0x%x\n", name, st);
    vdev_reset(&dev);
    int ok = device_up() && good_request();
    if (!ok)
        nfail++;
    print("hostile: case %s recovered=%s\n", name, ok ? "yes" : "no");
}

/* --- buffers the device must refuse ----------------------------------------------------------- */

static struct result in_request_to(u64 addr, u32 len)
{
    header(T_IN, 0, 1);
    desc(1, addr, len, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    desc(2, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    return submit(0);
}

static struct result c_past_ram_end(void) { return in_request_to(ram_end, 512); }
static struct result c_straddles_ram_end(void) { return in_request_to(ram_end - 512, 1024); }
static struct result c_in_mmio_window(void) { return in_request_to(base, 512); }
static struct result c_in_lapic(void) { return in_request_to(LAPIC_BASE, 512); }
static struct result c_addr_wraps(void) { return in_request_to(0xfffffffffffffe00ULL, 0x400); }
static struct result c_len_overflow(void) { return in_request_to(OWNED_END, 0xffffffffu); }

/* 64 writable buffers of 64 MiB inside RAM and one of 512 bytes: 4 GiB + 512 in all, which a
 * 32-bit sum would take for a valid one-sector read into the canary. */
static struct result c_len_sum_wraps(void)
{
    header(T_IN, 0, 1);
    for (u16 i = 1; i <= 64; i++)
        desc(i, OWNED_END, 64u << 20, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, (u16)(i + 1));
    desc(65, OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 66);
    desc(66, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    return submit(0);
}

/* --- chains ----------------------------------------------------------------------------------- */

static struct result c_chain_loop(void)
{
    header(T_IN, 0, 1);
    desc(1, OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    desc(2, OWNED_END + 4096, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1);
    return submit(0);
}

static struct result c_self_loop(void)
{
    header(T_IN, 0, 0);
    return submit(0);
}

static struct result c_next_out_of_range(void)
{
    header(T_IN, 0, 1);
    desc(1, OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0x7fff);
    return submit(0);
}

static struct result c_head_out_of_range(void)
{
    header(T_IN, 0, 1);
    desc(1, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    return submit((u16)(dev.qsize + 5));
}

static struct result c_avail_idx_jump(void)
{
    header(T_IN, 0, 1);
    desc(1, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    dev.avail->ring[0] = 0;
    barrier();
    dev.avail->idx = (u16)(dev.avail_idx + dev.qsize + 1);
    vq_notify(&dev);
    return wait_result();
}

/* --- indirect tables -------------------------------------------------------------------------- */

static struct result indirect(u64 table, u32 len, u16 flags)
{
    itable[0] = (struct virtq_desc){ (u64)&hdr, sizeof hdr, VIRTQ_DESC_F_NEXT, 1 };
    itable[1] = (struct virtq_desc){ OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2 };
    itable[2] = (struct virtq_desc){ (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0 };
    hdr = (struct blk_hdr){ T_IN, 0, 0 };
    desc(0, table, len, (u16)(VIRTQ_DESC_F_INDIRECT | flags), 0);
    return submit(0);
}

static struct result c_indirect_len_zero(void) { return indirect((u64)itable, 0, 0); }
static struct result c_indirect_len_unaligned(void) { return indirect((u64)itable, 40, 0); }
static struct result c_indirect_too_big(void) { return indirect((u64)itable, (dev.qsize + 1) * 16, 0); }
static struct result c_indirect_outside_ram(void) { return indirect(ram_end, 48, 0); }
static struct result c_indirect_with_next(void) { return indirect((u64)itable, 48, VIRTQ_DESC_F_NEXT); }

static struct result c_indirect_in_indirect(void)
{
    static struct virtq_desc inner[3] __attribute__((aligned(16)));
    inner[0] = (struct virtq_desc){ (u64)&hdr, sizeof hdr, VIRTQ_DESC_F_NEXT, 1 };
    inner[1] = (struct virtq_desc){ OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2 };
    inner[2] = (struct virtq_desc){ (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0 };
    hdr = (struct blk_hdr){ T_IN, 0, 0 };
    itable[0] = (struct virtq_desc){ (u64)inner, sizeof inner, VIRTQ_DESC_F_INDIRECT, 0 };
    desc(0, (u64)itable, 16, VIRTQ_DESC_F_INDIRECT, 0);
    return submit(0);
}

static struct result c_indirect_loop(void)
{
    itable[0] = (struct virtq_desc){ (u64)&hdr, sizeof hdr, VIRTQ_DESC_F_NEXT, 1 };
    itable[1] = (struct virtq_desc){ OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0 };
    hdr = (struct blk_hdr){ T_IN, 0, 0 };
    desc(0, (u64)itable, 32, VIRTQ_DESC_F_INDIRECT, 0);
    return submit(0);
}

/* --- malformed requests: an error status, not a reset ----------------------------------------- */

static struct result c_no_status_byte(void)
{
    header(T_IN, 0, 1);
    desc(1, OWNED_END, 512, 0, 0);           /* nothing device-writable: nowhere for a status */
    return submit(0);
}

static struct result c_readable_after_writable(void)
{
    header(T_OUT, 0, 1);
    desc(1, (u64)&status_byte, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    desc(2, (u64)buf, 512, 0, 0);
    return submit(0);
}

static struct result c_unknown_type(void)
{
    header(0x1234, 0, 1);
    desc(1, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    return submit(0);
}

static struct result c_short_header(void)
{
    header(T_IN, 0, 1);
    dev.desc[0].len = 8;
    desc(1, OWNED_END, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2);
    desc(2, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    return submit(0);
}

static struct result rw_at(u32 type, u64 sector, u64 addr, u32 len)
{
    header(type, sector, 1);
    desc(1, addr, len, (u16)(VIRTQ_DESC_F_NEXT | (type == T_IN ? VIRTQ_DESC_F_WRITE : 0)), 2);
    desc(2, (u64)&status_byte, 1, VIRTQ_DESC_F_WRITE, 0);
    return submit(0);
}

static struct result c_read_past_end(void) { return rw_at(T_IN, capacity, OWNED_END, 512); }
static struct result c_read_straddles_end(void) { return rw_at(T_IN, capacity - 1, OWNED_END, 1024); }
static struct result c_sector_overflow(void) { return rw_at(T_IN, 1ULL << 63, OWNED_END, 512); }
static struct result c_write_partial_sector(void) { return rw_at(T_OUT, 0, (u64)buf, 100); }

/* --- queue set-up the device must refuse at DRIVER_OK ------------------------------------------ */

static struct result bad_queue(u32 qsize, u64 d, u64 a, u64 u)
{
    vdev_reset(&dev);
    struct vdev tmp;
    if (vdev_negotiate(&tmp, base, VIRTIO_ID_BLOCK, F_INDIRECT_DESC))
        return (struct result){ R_TIMEOUT, 0 };
    dev = tmp;
    u32 st = vdev_setup_queue_raw(&dev, qsize, d, a, u);
    if (st & S_NEEDS_RESET)
        return (struct result){ R_NEEDS_RESET, 0 };
    /* Not refused at DRIVER_OK: it must be refused at the first request then. */
    if (!(st & S_DRIVER_OK))
        return (struct result){ R_TIMEOUT, 0 };
    vwrite(&dev, VM_QUEUE_NOTIFY, 0);
    for (int i = 0; i < 100000; i++)
        if (vread(&dev, VM_STATUS) & S_NEEDS_RESET)
            return (struct result){ R_NEEDS_RESET, 0 };
    return (struct result){ R_TIMEOUT, 0 };
}

static struct result c_ring_outside_ram(void)
{
    return bad_queue(QSIZE, ram_end + 0x10000, (u64)&vq_avail_mem, (u64)&vq_used_mem);
}

static struct result c_ring_above_4g(void)
{
    return bad_queue(QSIZE, (u64)vq_desc_mem, (u64)&vq_avail_mem, 0x1000000000000ULL);
}

static struct result c_ring_misaligned(void)
{
    return bad_queue(QSIZE, (u64)vq_desc_mem + 8, (u64)&vq_avail_mem, (u64)&vq_used_mem);
}

static struct result c_queue_size_not_pow2(void)
{
    return bad_queue(3, (u64)vq_desc_mem, (u64)&vq_avail_mem, (u64)&vq_used_mem);
}

static struct result c_queue_size_too_big(void)
{
    return bad_queue(0x10000, (u64)vq_desc_mem, (u64)&vq_avail_mem, (u64)&vq_used_mem);
}

/* --- register abuse: ignored, the device keeps working ------------------------------------------ */

static struct result c_register_abuse(void)
{
    mmio_write8(base + VM_STATUS, 0);               /* registers are 32-bit only */
    (void)mmio_read64(base + VM_MAGIC);
    (void)mmio_read8(base + VM_STATUS + 1);
    vwrite(&dev, VM_QUEUE_NUM, 3);                  /* the live queue's configuration is frozen */
    vwrite(&dev, VM_QUEUE_DESC_LOW, 0x12345678);
    vwrite(&dev, VM_QUEUE_NOTIFY, 7);               /* no such queue */
    vwrite(&dev, VM_QUEUE_SEL, 9);
    (void)vread(&dev, VM_QUEUE_NUM_MAX);
    vwrite(&dev, VM_QUEUE_SEL, 0);
    vwrite(&dev, VM_CONFIG + 0x1000, 0xffffffff);   /* past the window's config space */
    return rw_at(T_IN, 0, (u64)buf, 512);
}

/* --- unassigned MMIO and port I/O ---------------------------------------------------------------- */

static void mmio_probe(u64 a)
{
    mmio_write32(a, 0x12345678);
    print("hostile: unassigned mmio addr=0x%lx size=1 value=0x%x\n", a, mmio_read8(a));
    print("hostile: unassigned mmio addr=0x%lx size=2 value=0x%x\n", a, mmio_read16(a));
    print("hostile: unassigned mmio addr=0x%lx size=4 value=0x%x\n", a, mmio_read32(a));
    print("hostile: unassigned mmio addr=0x%lx size=8 value=0x%lx\n", a, mmio_read64(a));
}

static void pio_probe(u16 port)
{
    outl(port, 0x80000000u);
    print("hostile: unassigned pio port=0x%x size=1 value=0x%x\n", port, inb(port));
    print("hostile: unassigned pio port=0x%x size=2 value=0x%x\n", port, inw(port));
    print("hostile: unassigned pio port=0x%x size=4 value=0x%x\n", port, inl(port));
}

static void fill(u64 start, u64 end)
{
    for (u64 p = start; p < end; p += 4096) {
        u64 *w = (u64 *)p;
        for (int i = 0; i < 512; i++)
            w[i] = p ^ CANARY_KEY;
    }
}

static void fill_canary(void)
{
    fill(OWNED_END, OWNED_END + CANARY_SIZE);
    fill(ram_end - CANARY_SIZE, ram_end);
}

#define CASE(n) run_case(#n, c_##n)

int main(void)
{
    u32 irq;
    unsigned slot = (unsigned)arg_u64("slot", 0);
    ram_end = ram_end_below_4g();
    if ((u64)_image_end > OWNED_END || ram_end < OWNED_END + (64ULL << 20) + 4 * CANARY_SIZE) {
        print("hostile: image end %p or RAM end 0x%lx does not fit the layout\n", _image_end, ram_end);
        return 1;
    }
    if (!virtio_mmio_slot(slot, &base, &irq)) {
        print("hostile: no virtio_mmio.device entry %u on the command line\n", slot);
        return 1;
    }
    fill_canary();
    if (!device_up())
        return 1;
    capacity = mmio_read32(base + VM_CONFIG) | (u64)mmio_read32(base + VM_CONFIG + 4) << 32;
    print("hostile: ready owned_end=0x%lx canary_size=0x%lx ram_end=0x%lx canary_key=0x%lx device=0x%lx "
          "capacity=%lu\n", OWNED_END, CANARY_SIZE, ram_end, CANARY_KEY, base, capacity);

    CASE(past_ram_end);
    CASE(straddles_ram_end);
    CASE(in_mmio_window);
    CASE(in_lapic);
    CASE(addr_wraps);
    CASE(len_overflow);
    CASE(len_sum_wraps);
    CASE(chain_loop);
    CASE(self_loop);
    CASE(next_out_of_range);
    CASE(head_out_of_range);
    CASE(avail_idx_jump);
    CASE(indirect_len_zero);
    CASE(indirect_len_unaligned);
    CASE(indirect_too_big);
    CASE(indirect_outside_ram);
    CASE(indirect_with_next);
    CASE(indirect_in_indirect);
    CASE(indirect_loop);
    CASE(no_status_byte);
    CASE(readable_after_writable);
    CASE(unknown_type);
    CASE(short_header);
    CASE(read_past_end);
    CASE(read_straddles_end);
    CASE(sector_overflow);
    CASE(write_partial_sector);
    CASE(ring_outside_ram);
    CASE(ring_above_4g);
    CASE(ring_misaligned);
    CASE(queue_size_not_pow2);
    CASE(queue_size_too_big);
    CASE(register_abuse);

    mmio_probe(0xc0000000UL);                        /* start of the 32-bit MMIO gap */
    mmio_probe(0xd0100000UL);                        /* past every virtio-mmio window */
    mmio_probe(0xfe000000UL);
    mmio_probe(ram_end);                             /* just above RAM */
    pio_probe(0x2f8);                                /* COM2: not on this machine */
    pio_probe(0xcfc);                                /* PCI config data: no PCI on microvm */
    pio_probe(0x1234);
    print("hostile: done cases=%d failed_recoveries=%d\n", ncases, nfail);
    return 0;
}
