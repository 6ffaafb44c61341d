"""Leases: the name this worker process holds studies under, which studies its running tasks hold,
and its pulse (the heartbeat that renews those leases, and only those).

A lease belongs to the work in flight. A score task adds the studies it claims to this process's
holdings and takes them out when it has written them; whatever it still holds when it ends in any
other way (a retry, an exception, a time limit) is given back at once — the studies return to
``queued``, where the sweeper finds them if the task's own retry message is lost — and the heartbeat
never renews a lease no running task holds. A process that dies or freezes renews nothing: its
leases run out within one lease and the sweeper takes the studies over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter

from dermascan.config import Settings
from dermascan.infra.db import session_factory
from dermascan.screening import results

log = logging.getLogger(__name__)
_process_state: dict = {}  # this process's lease owner name, made after the fork


def lease_owner() -> str:
    """This worker process's name on the leases it holds: host, pid and a random part (a pid is
    reused after a restart; the lease of the process before must not look like ours)."""
    current = _process_state.get("owner")
    if current is None or current[0] != os.getpid():
        import secrets
        import socket

        name = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"
        current = _process_state["owner"] = (os.getpid(), name)
    return current[1]


class _Holdings:
    """The studies this process's running tasks hold (a count per study: two tasks may hold one)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids: Counter = Counter()

    def add(self, ids) -> None:
        with self._lock:
            self._ids.update(ids)

    def discard(self, ids) -> None:
        with self._lock:
            self._ids.subtract(ids)
            self._ids = +self._ids  # drop the ones at zero

    def snapshot(self) -> list[int]:
        with self._lock:
            return sorted(self._ids)


HELD = _Holdings()


class Holding:
    """What one task holds: claimed, then written (or given back when the task ends)."""

    def __init__(self):
        self.ids: set[int] = set()

    def claimed(self, ids) -> None:
        new = set(ids) - self.ids
        self.ids |= new
        HELD.add(new)

    def written(self, ids) -> None:
        done = set(ids) & self.ids
        self.ids -= done
        HELD.discard(done)


@contextlib.contextmanager
def holding(settings: Settings, owner: str):
    """A task's holdings: whatever it has not written when it ends is given back (status queued,
    lease cleared) — at once if the database answers, else by the lease running out, since no
    heartbeat renews it any more."""
    held = Holding()
    try:
        yield held
    finally:
        left = sorted(held.ids)
        HELD.discard(left)
        if left:
            try:
                with session_factory(settings.database_url)() as session, session.begin():
                    given = results.release(session, left, owner)
                log.info("gave back the leases of %d studies this task did not finish", given)
            except Exception as exc:  # the database is down: the leases run out on their own
                log.warning("could not give back %d leases (%s): they run out within %s s", len(left), exc,
                            settings.lease_s)  # fmt: skip


class Heartbeat:
    """Renews, every third of the lease and from a thread of its own, the leases of the studies this
    process's running tasks hold — the process's pulse: a task busy in a long forward pass keeps its
    studies, a process that is gone loses them within one lease, and a study no task holds any more
    is never kept."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def beat(self) -> int:
        ids = HELD.snapshot()
        if not ids:
            return 0
        with session_factory(self.settings.database_url)() as session, session.begin():
            return results.renew_leases(session, lease_owner(), self.settings.lease_s, ids)

    def _run(self) -> None:
        while not self.stop.wait(max(1.0, self.settings.lease_s / 3)):
            try:
                self.beat()
            except Exception as exc:  # the database is restarting: the next beat tries again
                log.warning("lease heartbeat failed: %s", exc)
