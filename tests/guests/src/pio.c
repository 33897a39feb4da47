/* pio: n= `out` instructions to port= (default 0x510, which nothing claims: every one is a full
 * exit to the VMM and back), bracketed by two lines so the host can time the loop. */
#include "lib.h"

int main(void)
{
    u64 n = arg_u64("n", 100000);
    u16 port = (u16)arg_u64("port", 0x510);
    print("pio: start n=%lu port=%x\n", n, port);
    u64 count = n;
    u64 t0 = rdtsc();
    /* The exact loop of bench/kvm_devices.py's bare KVM_RUN reference (out dx,al; dec rcx; jnz),
     * so both time the same guest instructions: under kvm-pvm each one costs. */
    if (n)
        __asm__ __volatile__("1: outb %%al, %%dx\n\tdec %%rcx\n\tjnz 1b"
                             : "+c"(n) : "a"(0), "d"(port) : "cc", "memory");
    u64 t1 = rdtsc();
    print("pio: done n=%lu tsc=%lu\n", count, t1 - t0);
    return 0;
}
