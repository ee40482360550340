"""Leases held by one run: its owner name, the claims it takes, and a heartbeat renewing them.

A run's leases live as long as the run: a daemon thread pushes their expiry back every third
of the lease, so a cell that runs for hours stays claimed, and a run that dies (killed, out of
memory, machine gone) stops renewing, its leases expire, and another run takes the cells.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from types import TracebackType

from robcomp.experiments.store import ResultStore

log = logging.getLogger(__name__)
LEASE_SECONDS = 120.0


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, cell_id: str) -> bool:
        """Take ``cell_id`` for this run; False when another live run holds it or it is done."""
        return self.store.claim(cell_id, self.owner, self.seconds)

    def claim_many(self, cell_ids: Sequence[str]) -> list[str]:
        """Take each of ``cell_ids`` in one statement; the ones this run now holds."""
        return self.store.claim_many(cell_ids, self.owner, self.seconds)

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
