"""Lease owners: who may be declared dead at once, and who only when the lease ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from adsync.owner import host_identity, local_owner_is_dead, make_owner

# A pid surely finished comes from a process started and waited for.
pytestmark = pytest.mark.slow


def _a_finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_this_process_is_alive() -> None:
    owner = make_owner()
    assert owner.startswith(f"{host_identity()}:{os.getpid()}:")
    assert not local_owner_is_dead(owner)


def test_a_finished_process_of_this_host_is_dead() -> None:
    assert local_owner_is_dead(f"{host_identity()}:{_a_finished_pid()}:abc")


def test_another_pid_namespace_with_the_same_host_name_is_not_judged() -> None:
    # Containers sharing a host name number their processes on their own: a pid
    # missing here may be alive next door, so only the lease can tell.
    pid = _a_finished_pid()
    assert not local_owner_is_dead(f"{socket.gethostname()}@1:{pid}:abc")
    if host_identity() != socket.gethostname():
        # An owner written without a namespace cannot be placed either.
        assert not local_owner_is_dead(f"{socket.gethostname()}:{pid}:abc")


def test_another_host_or_an_unreadable_owner_is_not_judged() -> None:
    assert not local_owner_is_dead(f"elsewhere.example:{_a_finished_pid()}:abc")
    assert not local_owner_is_dead("nonsense")
    assert not local_owner_is_dead(f"{host_identity()}:notapid:abc")
