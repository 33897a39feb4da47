/* pio: n= `out` instructions to port= (default 0x510, which nothing claims: every one is a full
 * exit to the VMM and back), bracketed by two lines so the host can time the loop. */
#include "lib.h"

int main(void)
{
    u64 n = arg_u64("n", 100000);
    u16 port = (u16)arg_u64("port", 0x510);
    print("pio: start n=%lu port=%x\n", n, port);
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++)
        outb(port, (u8)i);
    u64 t1 = rdtsc();
    print("pio: done n=%lu tsc=%lu\n", n, t1 - t0);
    return 0;
}
