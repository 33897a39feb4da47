"""Clearing the way for a listening unix socket: a dead one is replaced, a live one is not."""

from __future__ import annotations

import os
import socket
import stat

from domain.errors import HostResourceError


def replace_stale_socket(path: str, what: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on, so the caller can bind there.

    A missing path is fine. Anything else raises HostResourceError("<what>: <reason>"): a file
    that is not a socket, a socket another process listens on, or an error probing it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise HostResourceError(f"{what}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise HostResourceError(f"{what}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left over from a process that died
            return
        except TimeoutError:
            pass  # a listener with a full backlog: alive
        except OSError as exc:  # EACCES and the like: not ours to replace
            raise HostResourceError(f"{what}: {exc.strerror or exc}") from exc
    raise HostResourceError(f"{what}: in use by another process")
