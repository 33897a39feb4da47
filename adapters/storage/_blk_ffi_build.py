"""cffi API-mode (out-of-line) module: virtio-blk's request loop in C, for raw images.

Built by setup.py (``cffi_modules``) or in place for development with
``python adapters/storage/_blk_ffi_build.py`` from the repository root.

What it serves is a strict subset of what the Python device model (domain/devices/virtio/block.py)
serves: a chain (direct, or wholly in one indirect table, as Linux posts them) of a 16-byte
readable header, 1..PX_SEGS data buffers all in the request's direction, and a lone 1-byte
writable status, for an IN or OUT request that lies
inside the disk; every buffer inside one guest RAM region. It stops *before* popping anything
else (flush, GET_ID, any malformed or hostile chain, an avail index that jumped) and the Python
model takes that request, with its error statuses and NEEDS_RESET, unchanged. Each ring field and
descriptor is loaded once (volatile) and only the loaded copy is checked and used, so a driver
rewriting the ring meanwhile cannot slip a value past a check. The GIL is released for the call.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

_CDEF = """
#define PX_SEGS ...
#define PX_MAX_REGIONS ...
#define PX_BUDGET ...
#define PX_IDLE ...
#define PX_SIGNAL ...
#define PX_DECLINE ...
#define PX_STOP ...
#define PX_BUDGET_DONE ...

struct px_region { uint64_t gpa; uint64_t size; uint8_t *hva; };

struct px_blk {
    struct px_region regions[8];
    uint32_t nregions;
    uint32_t size;
    int fd, bfd;
    uint64_t capacity;
    int readonly;
    volatile int stop;
    uint32_t next_avail, next_used;
    int32_t signalled_used;
    uint32_t event_idx;
    uint64_t rd_ops, rd_bytes, wr_ops, wr_bytes, errors;
    uint32_t poll_missed;
    uint32_t nwritten;
    uint64_t written[...];
    ...;
};

int px_blk_bind(struct px_blk *b, uint64_t desc, uint64_t avail, uint64_t used, uint32_t size);
int px_blk_serve(struct px_blk *b, uint64_t poll_ns, uint32_t budget);
"""

_SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#define PX_SEGS 16          /* data buffers per request served here; longer chains (up to our
                               seg_max, 254) go to the Python model */
#define PX_MAX_REGIONS 8
#define PX_BUDGET 64        /* requests per call: Python looks at pause, quiesce, dirty tracking */
#define PX_IDLE 0           /* nothing available (after the poll window, if any) */
#define PX_SIGNAL 1         /* a completion wants an interrupt: Python raises it */
#define PX_DECLINE 2        /* the request at the head is not ours: Python pops it */
#define PX_STOP 3           /* asked to stop (pause, quiesce) */
#define PX_BUDGET_DONE 4

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define T_IN 0
#define T_OUT 1
#define S_OK 0
#define S_IOERR 1
#define SECTOR 512

struct px_region { uint64_t gpa; uint64_t size; uint8_t *hva; };

struct px_blk {
    struct px_region regions[PX_MAX_REGIONS];
    uint32_t nregions;
    uint32_t size;                 /* queue size, a power of 2 */
    int fd, bfd;                   /* bfd: a buffered fd for what O_DIRECT refuses (EINVAL) */
    uint64_t capacity;             /* bytes, whole sectors */
    int readonly;
    volatile int stop;
    /* in/out across a serve call: the Python queue's state */
    uint32_t next_avail, next_used;
    int32_t signalled_used;        /* -1: none yet */
    uint32_t event_idx;
    /* out: what the call did */
    uint64_t rd_ops, rd_bytes, wr_ops, wr_bytes, errors;
    uint32_t poll_missed;
    uint32_t nwritten;             /* (gpa, len) pairs in written[]: guest RAM the call wrote */
    uint64_t written[PX_BUDGET * (PX_SEGS + 1) * 2];
    /* the rings, host addresses (bind) */
    volatile uint8_t *desc;
    volatile uint16_t *avail;
    volatile uint8_t *used;
};

struct px_req {
    uint16_t head;
    uint32_t type;
    uint64_t offset;
    uint64_t len;
    int nseg;
    volatile uint8_t *status;
    uint64_t status_gpa;
    uint64_t gpa[PX_SEGS];
    struct iovec iov[PX_SEGS];
};

struct px_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

static uint8_t *px_hva(const struct px_blk *b, uint64_t gpa, uint64_t len)
{
    uint32_t i;
    for (i = 0; i < b->nregions; i++) {
        const struct px_region *r = &b->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

static int px_blk_bind(struct px_blk *b, uint64_t desc, uint64_t avail, uint64_t used, uint32_t size)
{
    if (size == 0 || (size & (size - 1)) || size > 32768)
        return -EINVAL;
    b->desc = px_hva(b, desc, 16ull * size);
    b->avail = (volatile uint16_t *)px_hva(b, avail, 6 + 2ull * size);
    b->used = px_hva(b, used, 6 + 8ull * size);
    if (!b->desc || !b->avail || !b->used || (desc & 15) || (avail & 1) || (used & 3))
        return -EFAULT;
    b->size = size;
    return 0;
}

static void px_read_desc(const volatile uint8_t *table, uint32_t i, struct px_desc *d)
{
    const volatile uint64_t *p = (const volatile uint64_t *)(table + 16 * (uint64_t)i);
    uint64_t a = p[0], w = p[1];
    d->addr = a;
    d->len = (uint32_t)w;
    d->flags = (uint16_t)(w >> 32);
    d->next = (uint16_t)(w >> 48);
}

/* 1 and r filled when the chain at head is ours; 0 (nothing consumed) otherwise. */
static int px_parse(const struct px_blk *b, uint16_t head, struct px_req *r)
{
    struct px_desc d;
    volatile uint8_t *h;
    const volatile uint8_t *table = b->desc;
    uint32_t type, idx, want, hops = 0, table_len = b->size;
    uint64_t sector, total = 0;
    int n = 0;

    if (head >= b->size)
        return 0;
    px_read_desc(table, head, &d);
    if (d.flags & DESC_F_INDIRECT) {
        /* the whole chain in an indirect table (Linux's requests): the Python model's rules,
           and 16-byte alignment as a descriptor table has (what is not gets declined) */
        if (d.flags != DESC_F_INDIRECT || d.len == 0 || d.len % 16 || d.len / 16 > b->size || (d.addr & 15)
            || !(table = px_hva(b, d.addr, d.len)))
            return 0;
        table_len = d.len / 16;
        px_read_desc(table, 0, &d);
    }
    if (d.flags != DESC_F_NEXT || d.len != 16 || !(h = px_hva(b, d.addr, 16)))
        return 0;
    {
        /* copied once, byte by byte (any alignment): the driver may rewrite it meanwhile */
        uint8_t hdr[16];
        int i;
        for (i = 0; i < 16; i++)
            hdr[i] = h[i];
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
    }
    if (type == T_IN)
        want = DESC_F_WRITE;
    else if (type == T_OUT && !b->readonly)
        want = 0;
    else
        return 0;
    idx = d.next;
    for (;;) {
        uint8_t *p;
        if (idx >= table_len || ++hops > PX_SEGS + 1)
            return 0;
        px_read_desc(table, idx, &d);
        if (!(d.flags & DESC_F_NEXT))
            break;  /* the last one: the status byte */
        if (d.flags != (DESC_F_NEXT | want) || d.len == 0 || n == PX_SEGS)
            return 0;
        if (!(p = px_hva(b, d.addr, d.len)))
            return 0;
        r->iov[n].iov_base = p;
        r->iov[n].iov_len = d.len;
        r->gpa[n] = d.addr;
        total += d.len;
        n++;
        idx = d.next;
    }
    if (n == 0 || d.flags != DESC_F_WRITE || d.len != 1 || !(r->status = px_hva(b, d.addr, 1)))
        return 0;
    if (total % SECTOR || sector > b->capacity / SECTOR || total > b->capacity - sector * SECTOR)
        return 0;  /* out of range: the Python model answers IOERR */
    r->status_gpa = d.addr;
    r->head = head;
    r->type = type;
    r->offset = sector * SECTOR;
    r->len = total;
    r->nseg = n;
    return 1;
}

static int64_t px_io(int fd, const struct px_req *r)
{
    ssize_t n;
    do {
        n = r->type == T_IN ? preadv(fd, r->iov, r->nseg, (off_t)r->offset)
                            : pwritev(fd, r->iov, r->nseg, (off_t)r->offset);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

static int64_t px_execute(const struct px_blk *b, const struct px_req *r)
{
    int64_t n = px_io(b->fd, r);
    if (n == -EINVAL && b->bfd != b->fd)
        n = px_io(b->bfd, r);  /* buffers O_DIRECT cannot take */
    return n;
}

static void px_note(struct px_blk *b, uint64_t gpa, uint64_t len)
{
    if (b->nwritten < PX_BUDGET * (PX_SEGS + 1)) {
        b->written[2 * b->nwritten] = gpa;
        b->written[2 * b->nwritten + 1] = len;
        b->nwritten++;
    }
}

static void px_complete(struct px_blk *b, const struct px_req *r, int64_t result)
{
    int ok = result >= 0 && (uint64_t)result == r->len;
    uint32_t used_len = 1;
    uint32_t slot;
    volatile uint32_t *elem;
    int i;

    if (r->type == T_IN)
        for (i = 0; i < r->nseg; i++)
            px_note(b, r->gpa[i], r->iov[i].iov_len);
    px_note(b, r->status_gpa, 1);
    *r->status = ok ? S_OK : S_IOERR;  /* the status byte goes after the data */
    if (!ok) {
        b->errors++;
    } else if (r->type == T_IN) {
        b->rd_ops++;
        b->rd_bytes += r->len;
        used_len = (uint32_t)r->len + 1;
    } else {
        b->wr_ops++;
        b->wr_bytes += r->len;
    }
    slot = b->next_used & (b->size - 1);
    elem = (volatile uint32_t *)(b->used + 4 + 8 * (uint64_t)slot);
    elem[0] = r->head;
    elem[1] = used_len;
    b->next_used = (b->next_used + 1) & 0xFFFF;
    /* the element before the index that publishes it */
    __atomic_store_n((uint16_t *)(b->used + 2), (uint16_t)b->next_used, __ATOMIC_RELEASE);
}

static int px_needs_notification(struct px_blk *b)
{
    uint16_t now, old, used_event;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* the used index is out before the flags are read */
    if (!b->event_idx)
        return !(b->avail[0] & AVAIL_F_NO_INTERRUPT);
    now = (uint16_t)b->next_used;
    if (b->signalled_used < 0) {
        b->signalled_used = now;
        return 1;
    }
    old = (uint16_t)b->signalled_used;
    b->signalled_used = now;
    used_event = b->avail[2 + b->size];
    return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
}

static uint64_t px_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint16_t px_avail_idx(const struct px_blk *b)
{
    return __atomic_load_n((const uint16_t *)&b->avail[1], __ATOMIC_ACQUIRE);
}

/* Serve at most budget requests, until one of the PX_* reasons. Notifications are off (the
   caller's doing); poll_ns: how long to watch an empty ring before returning PX_IDLE. */
static int px_blk_serve(struct px_blk *b, uint64_t poll_ns, uint32_t budget)
{
    uint32_t done = 0;
    uint64_t deadline = 0;

    if (budget == 0 || budget > PX_BUDGET)
        budget = PX_BUDGET;  /* written[] holds PX_BUDGET requests */
    b->rd_ops = b->rd_bytes = b->wr_ops = b->wr_bytes = b->errors = 0;
    b->poll_missed = 0;
    b->nwritten = 0;
    for (;;) {
        struct px_req r;
        uint16_t pending, head;
        if (b->stop)
            return PX_STOP;
        pending = (uint16_t)(px_avail_idx(b) - b->next_avail);
        if (pending == 0) {
            uint32_t spins = 0;
            if (!poll_ns)
                return PX_IDLE;
            if (!deadline)
                deadline = px_now_ns() + poll_ns;
            while (px_avail_idx(b) == (uint16_t)b->next_avail) {
                if (b->stop)
                    return PX_STOP;
                if ((++spins & 63) == 0 && px_now_ns() >= deadline) {
                    b->poll_missed = 1;
                    return PX_IDLE;
                }
                __builtin_ia32_pause();
            }
            continue;
        }
        deadline = 0;  /* the window restarts each time the ring goes empty */
        if (pending > b->size)
            return PX_DECLINE;  /* the Python model reports the broken ring */
        if (done == budget)
            return PX_BUDGET_DONE;
        head = b->avail[2 + (b->next_avail & (b->size - 1))];
        if (!px_parse(b, head, &r))
            return PX_DECLINE;
        b->next_avail = (b->next_avail + 1) & 0xFFFF;
        px_complete(b, &r, px_execute(b, &r));
        done++;
        if (px_needs_notification(b))
            return PX_SIGNAL;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source("adapters.storage._blk_cffi", _SOURCE)

if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run as a script
    from adapters._ffi_inplace import build_in_place

    build_in_place(ffibuilder, __file__, "_blk_cffi")
