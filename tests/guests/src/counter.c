/* counter: increments the 64-bit counter at guest-physical addr= (default 0x300000) forever,
 * so a host reading it twice can tell a running guest from a paused one. */
#include "lib.h"

int main(void)
{
    u64 addr = arg_u64("addr", 0x300000);
    if ((addr >= (u64)_image_start && addr < (u64)_image_end) || addr % 8 || addr >= ram_end_below_4g()) {
        print("counter: bad addr=%lx\n", addr);
        return 1;
    }
    volatile u64 *c = (volatile u64 *)addr;
    *c = 0;
    print("counter: running at %lx\n", addr);
    for (;;)
        (*c)++;
}
