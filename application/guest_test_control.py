"""Use cases behind the `x-` QMP commands that the test hypervisor offers (-accel test).

They let a management stack (and our e2e tests) make the fake guest dirty its memory, and let
anyone compare guest memory across a snapshot or a migration by digest.
"""

from __future__ import annotations

from domain.errors import InvalidArgumentError
from domain.memory import PAGE_SIZE

MAX_TOUCH_PAGES = 1 << 20


_ZEROS = memoryview(bytes(1 << 20))


class GuestTestControl:
    def __init__(self, vm, write_file=None, populated_runs=None):
        """``populated_runs(view)``: (offset, length) runs of the pages the host populated, or
        None when unknown (the zero scanner's); the digest hashes the others as zeros."""
        self.vm = vm
        self._write_file = write_file
        self._populated_runs = populated_runs

    def pmemsave(self, val: int, size: int, filename: str) -> dict:
        """QEMU's pmemsave: guest-physical memory [val, val+size) into a host file."""
        if size < 0 or val < 0:
            raise InvalidArgumentError("pmemsave: 'val' and 'size' must not be negative")
        data = self.vm.memory.read(val, size)  # GuestMemoryError outside RAM
        self._write_file(filename, data)
        return {}

    def touch(self, pages: int, seed: int = 0) -> dict:
        """The fake guest writes a seed-derived pattern into ``pages`` pseudo-random pages."""
        if not 0 < pages <= MAX_TOUCH_PAGES:
            raise InvalidArgumentError(f"'pages' must be 1..{MAX_TOUCH_PAGES}")
        hv = self.vm.hv_vm
        if not hasattr(hv, "guest_write"):
            raise InvalidArgumentError("x-guest-touch needs -accel test")
        import random

        rng = random.Random(seed)
        regions = self.vm.memory.regions
        total = sum(r.size for r in regions) // PAGE_SIZE
        # Only a running guest writes, and never across a pause: a migration's final pass then
        # sees every page the guest wrote before it stopped.
        with self.vm.guest_running():
            for _ in range(pages):
                n = rng.randrange(total)
                for r in regions:
                    if n < r.size // PAGE_SIZE:
                        gpa = r.gpa + n * PAGE_SIZE
                        break
                    n -= r.size // PAGE_SIZE
                hv.guest_write(gpa, rng.randbytes(64) * (PAGE_SIZE // 64))
        return {"touched": pages}

    def memory_digest(self) -> dict:
        """SHA-256 of guest RAM. Pages the host never populated are hashed as the zeros they
        read as, without reading them: a read would map the zero page behind each one, and a
        later snapshot or migration would then have to scan them (a 1 GiB idle migration
        after a digest took 55-74 ms that way, 11 ms now)."""
        import hashlib

        h = hashlib.sha256()
        for r in self.vm.memory.regions:
            runs = self._populated_runs(r.view) if self._populated_runs is not None else None
            if runs is None:
                h.update(r.view)
                continue
            pos = 0
            for off, length in [*runs, (r.size, 0)]:
                _hash_zeros(h, off - pos)
                h.update(r.view[off : off + length])
                pos = off + length
        return {"sha256": h.hexdigest()}


def _hash_zeros(h, n: int) -> None:
    while n > 0:
        take = min(n, len(_ZEROS))
        h.update(_ZEROS[:take])
        n -= take
