/* hello: one exact line on COM1 (with the command line's token=, default "world"), then an
 * i8042 reset, so pystrato exits with SHUTDOWN guest-reset. */
#include "lib.h"

int main(void)
{
    size_t n;
    const char *tok = arg("token", &n);
    if (!tok)
        tok = "world", n = 5;
    print("hello from the pystrato test guest: ");
    for (size_t i = 0; i < n; i++)
        putc(tok[i]);
    putc('\n');
    return 0;
}
