/* A minimal polling virtio-mmio (version 2) driver core: one split virtqueue in guest RAM,
 * no interrupts (the guest runs with IF=0 and polls the used ring). */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "lib.h"

#define VIRTIO_MAGIC 0x74726976u
#define VIRTIO_ID_BLOCK 2

/* virtio-mmio registers (virtio 1.1 §4.2.2) */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEVICE_FEATURES 0x010
#define VM_DEVICE_FEATURES_SEL 0x014
#define VM_DRIVER_FEATURES 0x020
#define VM_DRIVER_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INTERRUPT_STATUS 0x060
#define VM_INTERRUPT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LOW 0x080
#define VM_QUEUE_DESC_HIGH 0x084
#define VM_QUEUE_DRIVER_LOW 0x090
#define VM_QUEUE_DRIVER_HIGH 0x094
#define VM_QUEUE_DEVICE_LOW 0x0a0
#define VM_QUEUE_DEVICE_HIGH 0x0a4
#define VM_CONFIG 0x100

#define S_ACKNOWLEDGE 0x01
#define S_DRIVER 0x02
#define S_DRIVER_OK 0x04
#define S_FEATURES_OK 0x08
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define F_VERSION_1 (1ULL << 32)
#define F_INDIRECT_DESC (1ULL << 28)

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

#define QMAX 256

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[QMAX];
    u16 used_event;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[QMAX];
    u16 avail_event;
};

struct vdev {
    u64 base;
    u32 device_id;
    u64 device_features;
    u64 features;            /* negotiated */
    u16 qsize;
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    u16 avail_idx;           /* next avail slot the driver fills */
    u16 last_used;           /* used entries consumed so far */
};

/* Outcome of waiting on the device. */
enum { WAIT_DONE = 0, WAIT_NEEDS_RESET = 1, WAIT_TIMEOUT = 2 };

static inline u32 vread(struct vdev *d, u32 off) { return mmio_read32(d->base + off); }
static inline void vwrite(struct vdev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

/* Probe the slot (magic, version 2, device id), reset, negotiate want & offered | VERSION_1 up
 * to FEATURES_OK. Returns 0, or prints why and returns -1. */
int vdev_negotiate(struct vdev *d, u64 base, u32 device_id, u64 want_features);
/* vdev_negotiate, then queue 0 of qsize entries (at most the device's maximum and QMAX) in
 * vq_*_mem and DRIVER_OK. Returns 0, or prints why and returns -1. */
int vdev_init(struct vdev *d, u64 base, u32 device_id, u64 want_features, u16 qsize);
/* Queue 0 setup with explicit ring addresses and size (the hostile guest's bad rings), then
 * DRIVER_OK; returns the status register afterwards. */
u32 vdev_setup_queue_raw(struct vdev *d, u32 qsize, u64 desc, u64 avail, u64 used);
void vdev_reset(struct vdev *d);
/* Publish head in the avail ring (without notifying). */
void vq_push(struct vdev *d, u16 head);
void vq_notify(struct vdev *d);
/* Wait for the next used element; on WAIT_DONE fills *id and *len. */
int vq_wait(struct vdev *d, u32 *id, u32 *len, u64 timeout_cycles);
/* vq_wait's spins between two Status reads (each an exit to the VMM): 4096 suits ring 0, which
 * kvm-pvm emulates at ~1.5 us per spin; ring 3 spins ~1000x faster and raises it. */
extern u64 vq_check_every;

/* Ring memory of queue 0 (guest RAM, owned by the driver). */
extern struct virtq_desc vq_desc_mem[QMAX];
extern struct virtq_avail vq_avail_mem;
extern struct virtq_used vq_used_mem;

#endif
