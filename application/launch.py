"""The `pystrato` console script's entry point.

Start-up imports ~170 modules and builds the VM: many objects allocated, few freed, and the
cyclic garbage collector ran again and again over them for nothing (~11% of `import asyncio`
by `perf record` here). So the collector is off from this module's import until the VMM serves
QMP; then the start-up objects are frozen out of later collections and it is on again
(cli._end_startup): the greeting came 6% sooner (median of 21). Everything else is
application.cli's.
"""

import gc

gc.disable()


def main() -> int:
    from application.cli import main as cli_main

    return cli_main()
