/* The polling virtio-mmio driver core behind virtio.h. */
#include "virtio.h"

struct virtq_desc vq_desc_mem[QMAX] __attribute__((aligned(4096)));
struct virtq_avail vq_avail_mem __attribute__((aligned(4096)));
struct virtq_used vq_used_mem __attribute__((aligned(4096)));

void vdev_reset(struct vdev *d)
{
    vwrite(d, VM_STATUS, 0);
    /* virtio 1.1 §4.2.3.1: reset is complete when Status reads back 0. */
    for (int i = 0; i < 1000000 && vread(d, VM_STATUS); i++)
        cpu_relax();
}

static void set_status(struct vdev *d, u32 bits)
{
    vwrite(d, VM_STATUS, vread(d, VM_STATUS) | bits);
}

int vdev_negotiate(struct vdev *d, u64 base, u32 device_id, u64 want)
{
    memset(d, 0, sizeof *d);
    d->base = base;
    u32 magic = vread(d, VM_MAGIC), version = vread(d, VM_VERSION);
    d->device_id = vread(d, VM_DEVICE_ID);
    if (magic != VIRTIO_MAGIC || version != 2 || d->device_id != device_id) {
        print("virtio: no device %u at %lx (magic=%x version=%u id=%u)\n", device_id, base, magic, version,
              d->device_id);
        return -1;
    }
    vdev_reset(d);
    set_status(d, S_ACKNOWLEDGE);
    set_status(d, S_DRIVER);
    vwrite(d, VM_DEVICE_FEATURES_SEL, 0);
    u64 f = vread(d, VM_DEVICE_FEATURES);
    vwrite(d, VM_DEVICE_FEATURES_SEL, 1);
    f |= (u64)vread(d, VM_DEVICE_FEATURES) << 32;
    d->device_features = f;
    if (!(f & F_VERSION_1)) {
        print("virtio: device offers no VIRTIO_F_VERSION_1\n");
        return -1;
    }
    d->features = (want & f) | F_VERSION_1;
    vwrite(d, VM_DRIVER_FEATURES_SEL, 0);
    vwrite(d, VM_DRIVER_FEATURES, (u32)d->features);
    vwrite(d, VM_DRIVER_FEATURES_SEL, 1);
    vwrite(d, VM_DRIVER_FEATURES, (u32)(d->features >> 32));
    set_status(d, S_FEATURES_OK);
    if (!(vread(d, VM_STATUS) & S_FEATURES_OK)) {
        print("virtio: device refused features %lx\n", d->features);
        return -1;
    }
    return 0;
}

int vdev_init(struct vdev *d, u64 base, u32 device_id, u64 want, u16 qsize)
{
    if (vdev_negotiate(d, base, device_id, want))
        return -1;
    vwrite(d, VM_QUEUE_SEL, 0);
    u32 max = vread(d, VM_QUEUE_NUM_MAX);
    if (max == 0) {
        print("virtio: queue 0 is not available\n");
        return -1;
    }
    if (qsize > max)
        qsize = (u16)max;
    if (qsize > QMAX)
        qsize = QMAX;
    u32 st = vdev_setup_queue_raw(d, qsize, (u64)vq_desc_mem, (u64)&vq_avail_mem, (u64)&vq_used_mem);
    if ((st & (S_DRIVER_OK | S_NEEDS_RESET | S_FAILED)) != S_DRIVER_OK) {
        print("virtio: device did not go live (status %x)\n", st);
        return -1;
    }
    return 0;
}

u32 vdev_setup_queue_raw(struct vdev *d, u32 qsize, u64 desc, u64 avail, u64 used)
{
    d->qsize = (u16)qsize;
    d->desc = (struct virtq_desc *)desc;
    d->avail = (struct virtq_avail *)avail;
    d->used = (struct virtq_used *)used;
    d->avail_idx = d->last_used = 0;
    if (desc == (u64)vq_desc_mem) {
        memset(vq_desc_mem, 0, sizeof vq_desc_mem);
        memset(&vq_avail_mem, 0, sizeof vq_avail_mem);
        memset(&vq_used_mem, 0, sizeof vq_used_mem);
    }
    vwrite(d, VM_QUEUE_SEL, 0);
    vwrite(d, VM_QUEUE_NUM, qsize);
    vwrite(d, VM_QUEUE_DESC_LOW, (u32)desc);
    vwrite(d, VM_QUEUE_DESC_HIGH, (u32)(desc >> 32));
    vwrite(d, VM_QUEUE_DRIVER_LOW, (u32)avail);
    vwrite(d, VM_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
    vwrite(d, VM_QUEUE_DEVICE_LOW, (u32)used);
    vwrite(d, VM_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
    vwrite(d, VM_QUEUE_READY, 1);
    set_status(d, S_DRIVER_OK);
    return vread(d, VM_STATUS);
}

void vq_push(struct vdev *d, u16 head)
{
    d->avail->ring[d->avail_idx % d->qsize] = head;
    barrier();                               /* the entry before the index (x86 keeps store order) */
    d->avail_idx++;
    d->avail->idx = d->avail_idx;
}

void vq_notify(struct vdev *d)
{
    barrier();
    vwrite(d, VM_QUEUE_NOTIFY, 0);
}

u64 vq_check_every = 4096;

int vq_wait(struct vdev *d, u32 *id, u32 *len, u64 timeout)
{
    volatile u16 *used_idx = &d->used->idx;
    u64 t0 = 0;  /* read at the first check: rdtsc may exit to the hypervisor (it does on kvm-pvm) */
    for (u64 spins = 1;; spins++) {
        if (*used_idx != d->last_used) {
            barrier();
            struct virtq_used_elem e = ((volatile struct virtq_used *)d->used)->ring[d->last_used % d->qsize];
            d->last_used++;
            *id = e.id;
            *len = e.len;
            return WAIT_DONE;
        }
        if (spins % vq_check_every == 0) {   /* MMIO reads exit to the VMM: only now and then */
            if (vread(d, VM_STATUS) & S_NEEDS_RESET)
                return WAIT_NEEDS_RESET;
            u64 now = rdtsc();
            if (!t0)
                t0 = now;
            else if (now - t0 > timeout)
                return WAIT_TIMEOUT;
        }
        cpu_relax();
    }
}
