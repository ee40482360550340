"""Leases held by one run: its owner name, the claims it takes, and a heartbeat renewing them.

A run's leases live as long as the run: a daemon thread pushes their expiry back every third
of the lease, so a cell that runs for hours stays claimed, and a run that dies (killed, out of
memory, machine gone) stops renewing, its leases expire, and another run takes the cells.

A lease also records its owner's process (host, boot id and pid namespace, pid): a run on the
same machine that finds a cell held by a process that no longer exists takes it back at once,
without waiting for the expiry (a rerun right after ``kill -9``). Owners on other machines, or
whose process cannot be told, are judged by expiry alone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from robcomp.experiments.store import LeaseRow, Process, ResultStore

log = logging.getLogger(__name__)
LEASE_SECONDS = 120.0


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists and has not exited (a zombie, killed
    but not yet reaped by its parent, has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): existing is all we can tell
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def is_live(lease: LeaseRow, now: float, here: Process | None = None) -> bool:
    """Whether ``lease``'s owner is still working on its cell: a process of this machine
    (same host and boot) while it exists, any other while it renews the lease (not expired)."""
    here = here or Process.this()
    owner = lease.process
    if lease.state != "running":
        return False
    if owner is not None and here.boot and (owner.host, owner.boot) == (here.host, here.boot):
        return pid_alive(owner.pid) and lease.expires > now
    return lease.expires > now


def new_owner() -> str:
    """``host:pid:uuid``: which machine and process holds a lease, unique per run."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """The leases one run holds on ``store``, renewed in the background while it is open.

    Use as a context manager: on exit the heartbeat stops and every lease still running
    (cells interrupted or never finished) is released, so a rerun can take them at once.

    Args:
        store: the store the cells are claimed in.
        seconds: how long a claim lasts without renewal; a dead run's cells wait this long.
        owner: the lease owner (default: :func:`new_owner`).
    """

    def __init__(
        self, store: ResultStore, seconds: float = LEASE_SECONDS, owner: str | None = None
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"lease seconds must be > 0, got {seconds}")
        self.store = store
        self.seconds = seconds
        self.owner = owner or new_owner()
        self.process = Process.this()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, cell_id: str) -> bool:
        """Take ``cell_id`` for this run; False when another live run holds it or it is done."""
        return bool(self.claim_many([cell_id]))

    def claim_many(self, cell_ids: Sequence[str]) -> list[str]:
        """Take each of ``cell_ids`` in one statement; the ones this run now holds. Cells
        held by dead processes of this machine are taken back and claimed again."""
        taken = self.store.claim_many(cell_ids, self.owner, self.seconds, self.process)
        if len(taken) < len(cell_ids) and self.take_back_dead():
            taken = self.store.claim_many(cell_ids, self.owner, self.seconds, self.process)
        return taken

    def take_back_dead(self) -> int:
        """Free the running leases of this machine's processes that are gone (a run killed
        with ``kill -9``, out of memory); how many were freed."""
        here = self.process
        if not here.boot:
            return 0
        dead = [
            lease
            for lease in self.store.leases(host=here.host)
            if lease.boot == here.boot and lease.pid is not None and not pid_alive(lease.pid)
        ]
        if dead:
            log.info("taking back %d cells of dead runs: %s", len(dead),
                     ", ".join(sorted({lease.owner for lease in dead})))  # fmt: skip
        return self.store.take_back(dead)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.store.renew(self.owner, self.seconds)
            except Exception as err:  # a missed beat is retried; the lease has 2 more
                log.warning("could not renew the leases of %s: %s", self.owner, err)

    def __enter__(self) -> Leases:
        self._thread = threading.Thread(target=self._beat, name="robcomp-leases", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.store.release(self.owner)
