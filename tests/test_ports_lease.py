"""Port leases between jobs: which lock slots a block takes, and that two overlapping blocks
never both hold their lease (flocks taken by separate processes, as two jobs would)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from toksearch_launch.cluster.ports import (
    LOCK_SLOT, PortsLeased, node_lock_dir, choose_block, lease_ports, lock_slots, release_block, slot_lock_path,
)


def test_lock_slots_cover_every_port_of_a_block() -> None:
    assert lock_slots(range(0, LOCK_SLOT)) == [0]
    assert lock_slots(range(LOCK_SLOT - 1, LOCK_SLOT + 1)) == [0, 1]
    assert lock_slots(range(20030, 20030 + 1016)) == list(range(20030 // 64, (20030 + 1015) // 64 + 1))
    assert lock_slots([5, 700, 701]) == [0, 10]


@pytest.mark.parametrize("a,b", [((20000, 100), (20099, 10)), ((20000, 1016), (20500, 1016)),
                                 ((20010, 5), (20000, 64)), ((30000, 1), (30000, 1))])
def test_overlapping_blocks_always_share_a_slot(a: tuple[int, int], b: tuple[int, int]) -> None:
    ra, rb = range(a[0], a[0] + a[1]), range(b[0], b[0] + b[1])
    assert set(ra) & set(rb)
    assert set(lock_slots(ra)) & set(lock_slots(rb))


def test_disjoint_slots_mean_disjoint_ports() -> None:
    ra, rb = range(312 * LOCK_SLOT, 313 * LOCK_SLOT), range(313 * LOCK_SLOT, 330 * LOCK_SLOT)
    assert not set(lock_slots(ra)) & set(lock_slots(rb))


HOLD = r"""
import sys, time
from toksearch_launch.cluster.ports import lease_ports
lease = lease_ports(range(int(sys.argv[1]), int(sys.argv[2])), sys.argv[3])
print("HELD", flush=True)
sys.stdin.readline()
"""


def test_a_block_leased_by_another_process_is_refused_until_it_exits(tmp_path) -> None:
    lock_dir = str(tmp_path / "locks")
    other = subprocess.Popen([sys.executable, "-c", HOLD, "20000", "20100", lock_dir],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "HELD"
        with pytest.raises(PortsLeased, match=r"ports 20096-20159 are reserved by another job"):
            lease_ports(range(20099, 20200), lock_dir)
        lease_ports(range(20160, 20200), lock_dir).release()  # next slot up: free
    finally:
        other.kill()  # a dead holder's flocks go with it: no stale lease
        other.wait()
    lease = lease_ports(range(20099, 20200), lock_dir)
    assert len(lease.fds) == len(lock_slots(range(20099, 20200)))
    lease.release()
    assert stat.S_IMODE(os.stat(lock_dir).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) != 0o1777  # only dirs it made
    assert stat.S_IMODE(os.stat(slot_lock_path(20000 // LOCK_SLOT, lock_dir)).st_mode) == 0o644


def test_a_refused_lease_holds_nothing(tmp_path) -> None:
    lock_dir = str(tmp_path / "locks")
    held = lease_ports(range(20064, 20128), lock_dir)
    other = subprocess.Popen([sys.executable, "-c", HOLD, "20000", "20200", lock_dir],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = other.communicate(timeout=60)
    assert other.returncode != 0 and "PortsLeased" in err
    held.release()
    # the refused attempt took slot 20000-20063 first and must have let it go
    lease_ports(range(20000, 20064), lock_dir).release()


def test_choose_block_skips_a_block_another_process_leases(tmp_path) -> None:
    """fixed policy on a leased block: one clear error naming the lock."""
    other = subprocess.Popen([sys.executable, "-c", HOLD, "31000", "31010", node_lock_dir()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "HELD"
        with pytest.raises(Exception, match=r"site.ports.policy=fixed: ports 30976-31039 are reserved"):
            choose_block(10, "fixed", 31000)
        base = choose_block(10, "fixed", 31040)  # the next slot: free
        release_block(base)
    finally:
        other.kill()
        other.wait()
