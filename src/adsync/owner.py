"""Who holds a run: this process's name as a lease owner, and whether a named one is dead.

A lease owner is ``host:pid:random``. The host part is the host as the processes
that can see one another's pids know it, so that a process of this host that no
longer exists is recognised at once instead of when its lease runs out.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid

__all__ = ["host_identity", "identity_of", "local_owner_is_dead", "make_owner", "pid_namespace"]


def pid_namespace() -> str | None:
    """This process's pid namespace as Linux names it (``pid:[4026531836]``); None elsewhere."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def identity_of(host: str, namespace: str | None) -> str:
    """The identity of a host name seen from a pid namespace: ``host@inode``, or ``host``.

    Containers that share a host name (host networking) each number their processes
    on their own, so a pid missing in one says nothing about a process in the
    container next door: the namespace is part of who the host is.
    """
    inode = "".join(c for c in namespace or "" if c.isdigit())
    return f"{host}@{inode}" if inode else host


@functools.cache
def host_identity() -> str:
    """This host as the processes that see one another's pids know it (see :func:`identity_of`)."""
    return identity_of(socket.gethostname(), pid_namespace())


def make_owner() -> str:
    """A lease owner string for this process: ``host:pid:random`` (host: :func:`host_identity`)."""
    return f"{host_identity()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def local_owner_is_dead(owner: str) -> bool:
    """Whether ``owner`` names a process of this host that no longer exists.

    Only a definite answer counts: another host (or pid namespace), an unreadable
    owner or a pid that exists (even if reused) all say "not known dead", and the
    lease decides.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != host_identity() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
