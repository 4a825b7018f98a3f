"""Lease owners: who may be declared dead at once, and who only when the lease ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from adsync.owner import (
    host_identity,
    identity_of,
    local_owner_is_dead,
    make_owner,
    pid_namespace,
)

# A pid surely finished comes from a process started and waited for: the tests
# that need one are marked slow.
SLOW = pytest.mark.slow


def _a_finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_this_process_is_alive() -> None:
    owner = make_owner()
    assert owner.startswith(f"{host_identity()}:{os.getpid()}:")
    assert not local_owner_is_dead(owner)


@SLOW
def test_a_finished_process_of_this_host_is_dead() -> None:
    assert local_owner_is_dead(f"{host_identity()}:{_a_finished_pid()}:abc")


def test_the_pid_namespace_is_part_of_who_the_host_is() -> None:
    # Containers sharing a host name (host networking) number their processes on
    # their own: the same host name in two namespaces is two hosts.
    assert identity_of("web", "pid:[4026531836]") == "web@4026531836"
    assert identity_of("web", "pid:[4026532001]") != identity_of("web", "pid:[4026531836]")
    assert identity_of("web", None) == "web"
    # This process is its host name as seen from its own namespace.
    assert host_identity() == identity_of(socket.gethostname(), pid_namespace())


@SLOW
def test_another_pid_namespace_with_the_same_host_name_is_not_judged() -> None:
    # The container next door: a pid missing here may be alive there, so only
    # the lease can tell.
    # (Linux numbers namespace inodes from 0xF0000000: 1 is never this one.)
    next_door = identity_of(socket.gethostname(), "pid:[1]")
    pid = _a_finished_pid()
    assert not local_owner_is_dead(f"{next_door}:{pid}:abc")
    # The same pid written by a process of this namespace is judged.
    assert local_owner_is_dead(f"{host_identity()}:{pid}:abc")


@SLOW
def test_an_owner_written_without_a_namespace_is_not_judged_by_one_that_has_one() -> None:
    if pid_namespace() is None:
        pytest.skip("no pid namespaces on this system")
    assert not local_owner_is_dead(f"{socket.gethostname()}:{_a_finished_pid()}:abc")


@SLOW
def test_another_host_or_an_unreadable_owner_is_not_judged() -> None:
    assert not local_owner_is_dead(f"elsewhere.example:{_a_finished_pid()}:abc")
    assert not local_owner_is_dead("nonsense")
    assert not local_owner_is_dead(f"{host_identity()}:notapid:abc")
