"""Hosts that left the cluster: what they held is released once they have been gone for a grace period.

A host is gone when a healthy etcd holds no host record for it (its lease expired) while it still owns
memberships or endpoints. The first live host to notice writes a departure record (create-if-absent, so
the clock starts once for everybody and survives restarts); once the grace period has passed, any live
host releases the departed host's endpoints, memberships, addresses and pool references. Every release
compares what it read, so several hosts doing it at once is harmless. A host that comes back before the
end of the grace period loses nothing; one that comes back later takes its addresses back (see
NetworkDriver.republish) unless another container holds them by then, which is logged as a conflict.

Nothing here runs while etcd is unreachable: every step is an etcd call, and the first failure ends the
sweep until the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvstore import Keys, Store
from kvstore.records import DepartureRecord

log = logging.getLogger(__name__)


class Departures:
    def __init__(self, store: Store, keys: Keys, host: str, grace: float,
                 forget: list[Callable[[str], int]], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keys = keys
        self.host = host
        self.grace = grace
        self.forget = forget  # each releases one kind of record held by a host; returns how many changed
        self.clock = clock

    def sweep(self, endpoint_hosts: set[str]) -> list[str]:
        """One pass: note newly departed hosts, clear returned ones, release expired ones."""
        live = {Keys.last(kv.key) for kv in self.store.range(self.keys.hosts(), keys_only=True)[0]}
        members = {Keys.last(kv.key) for kv in self.store.range(self.keys.all_members(), keys_only=True)[0]}
        marks = {}
        for kv in self.store.range(self.keys.departed())[0]:
            try:
                marks[Keys.last(kv.key)] = (kv, DepartureRecord.load(kv.value, kv.key))
            except ValueError:
                self.store.delete(kv.key)
        now = self.clock()
        released = []
        for host, (kv, rec) in marks.items():
            if host in live:
                log.info("host %s is back after %.0fs away; nothing of it was released", host, now - rec.since)
                self.store.delete(kv.key)
            elif now - rec.since >= self.grace:
                changed = sum(fn(host) for fn in self.forget)
                self.store.delete(kv.key)
                released.append(host)
                log.warning("host %s gone for %.0fs (grace %.0fs): released %d of its records",
                            host, now - rec.since, self.grace, changed)
        for host in sorted((members | endpoint_hosts) - live - set(marks) - {self.host}):
            record = DepartureRecord(host=host, since=now, seen_by=self.host)
            if self.store.create(self.keys.departure(host), record.dump()):
                log.warning("host %s has no lease but still holds records; releasing them in %.0fs unless it "
                            "returns", host, self.grace)
        return released
