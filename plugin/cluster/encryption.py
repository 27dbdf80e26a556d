"""Encrypted networks: which ESP states, policies and guard rules this host should have, kept in the kernel.

Desired state, recomputed from the live host records whenever they or the local networks change:
- guard: the VNIs of this host's encrypted networks (plugin/kernel/ipsec.py); none -> no guard, no SAs;
- per live peer whose published keys are acceptable: one outbound policy, one outbound state, and an
  inbound state for every pair (one of our held epochs, one of the peer's published epochs).
Rotation is make-before-break: a new key pair's inbound states are installed before its public key is
published; peers then install theirs and switch their sending to it at once (its inbound side exists);
this host switches its own sending to the new epoch for a peer only once that peer's record says it has
seen it ("seen"). The previous epoch stays installed until the next rotation, so nothing in flight is lost.
A peer without acceptable keys gets no policy: the guard drops what would go to it (fail closed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvstore.records import HostRecord
from plugin.cluster.keyring import KeyRing, SAKey, derive, mac_of, verify
from plugin.kernel.ipsec import IPsec, Policy, State, missing_features

log = logging.getLogger(__name__)

ROTATION_PATIENCE = 3   # rotation periods a rotation waits for a lagging peer's ack


class Encryption:
    def __init__(self, keyring: KeyRing, ipsec: IPsec, host: str, vtep: Callable[[], str], port: int,
                 secret: str | None, rotation: float, key_bits: int) -> None:
        self.keyring = keyring
        self.ipsec = ipsec
        self.host = host
        self.vtep = vtep
        self.port = port
        self.secret = secret
        self.rotation = rotation
        self.key_bits = key_bits
        self.seen: dict[str, int] = {}          # peer -> newest of its epochs we hold inbound states for
        self.refused: dict[str, str] = {}       # peer -> why its keys were refused
        self.vnis: dict[int, str] = {}          # encrypted VNIs of this host -> network key
        self._guarded: dict[int, str] | None = None
        self._lock = threading.RLock()
        self._rotated = keyring.created()
        self._clean = False                     # no states or policies of ours in the kernel
        self._synced: object = None             # what the kernel was last programmed from
        self._missing: list[str] | None = None
        self._hosts: dict[str, HostRecord] = {}     # the live hosts the last sync saw
        self._want_policies: set[Policy] = set()   # the per-peer policies the last sync installed
        self._ready: set[int] = set()   # our epochs whose inbound states are in for every accepted peer
        self._ready_peers: set[str] = set()  # peers whose inbound states (under our nonce for them) are in
        self._waiting_for: list[str] = []

    # -- what this host publishes -----------------------------------------------------------------------

    def stamp(self, record: HostRecord) -> HostRecord:
        """This host's record with its public keys and `seen`: only keys whose inbound states are installed
        for every peer (a peer may send with a key the moment it sees it)."""
        keys = {e: k for e, k in self.keyring.public().items() if e in self._ready}
        record.public_keys = keys
        record.key_epoch = max(keys) if keys else None
        record.nonces = {p: n for p, n in self.keyring.nonces.items() if p in self._ready_peers}
        record.seen = dict(self.seen)
        record.key_mac = mac_of(self.secret, record.host, record.vtep, keys) if self.secret else None
        return record

    def missing(self) -> list[str]:
        """Kernel features encrypted networks need and this kernel lacks (probed once)."""
        if self._missing is None:
            self._missing = missing_features()
        return self._missing

    # -- rotation ---------------------------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """The kernel was last programmed from the current hosts and keys, without failures (a rotation, a
        repair or a failed peer unsettle it until the next sync)."""
        return self._synced is not None

    @property
    def rotated_at(self) -> float:
        return self._rotated

    def rotation_due(self) -> bool:
        """Time for a new key pair, and every peer has taken the current one.

        Rotating again before a peer has installed the current epoch would prune the epoch that peer still
        sends with (two are kept). So a rotation waits for the acks; a peer that has not taken it after
        ROTATION_PATIENCE rotation periods (stuck, or an older pyoverlay) no longer holds everyone back.
        """
        age = time.time() - self._rotated
        if age < self.rotation:
            return False
        lagging = self.lagging()
        if not lagging:
            return True
        if age < ROTATION_PATIENCE * self.rotation:
            if lagging != self._waiting_for:
                log.info("key rotation waits for %s to take epoch %d", ", ".join(lagging), self.keyring.epoch)
                self._waiting_for = lagging
            return False
        log.warning("rotating keys although %s has not taken epoch %d after %.0f s; its encrypted traffic may "
                    "drop until it catches up (see its log)", ", ".join(lagging), self.keyring.epoch, age)
        return True

    def lagging(self) -> list[str]:
        """Live peers that take part in encryption (they acknowledge our keys) but not yet our newest epoch."""
        with self._lock:
            epoch = self.keyring.epoch
            return sorted(name for name, rec in self._hosts.items()
                          if name != self.host and name not in self.refused and rec.seen
                          and rec.seen.get(self.host, 0) < epoch)

    def rotate(self) -> int:
        with self._lock:
            self._synced = None
            self._waiting_for = []
            epoch = self.keyring.rotate()
            self._rotated = time.time()
            log.info("new key pair, epoch %d", epoch)
            return epoch

    # -- kernel state -----------------------------------------------------------------------------------

    def guard(self, vnis: dict[int, str]) -> None:
        """Install the guard for these encrypted VNIs before any of their devices exist (fail closed): the
        kernel's catch-all xfrm policies for the encrypted port, and the firewall guard of the VNIs."""
        with self._lock:
            if vnis != self._guarded:
                if vnis:
                    self.ipsec.set_catchall(self.port)
                self.ipsec.set_guard(sorted(vnis), self.port)
                if not vnis:
                    self.ipsec.set_catchall(None, old=self.port)
                self._guarded = dict(vnis)
            self.vnis = dict(vnis)

    def guard_missing(self) -> list[str]:
        """The parts of the guard the kernel lost (a firewall reload, an `ip xfrm policy flush`)."""
        with self._lock:
            if not self.vnis:
                return []
            missing = []
            policies = self.ipsec.policy_listing()   # one read for the catch-alls and the per-peer policies
            if not self.ipsec.catchall_present(self.port, policies):
                missing.append("the xfrm catch-all policies")
            if not self.ipsec.guard_present(sorted(self.vnis)):
                missing.append(f"the {self.ipsec.backend()} guard")
            if self._want_policies and not set(self.ipsec.policies(policies)) >= self._want_policies:
                missing.append("per-peer xfrm policies")
            return missing

    def repair_guard(self) -> None:
        """Install every part of the guard again, and the peers' policies and states (they may be gone too)."""
        with self._lock:
            self._guarded = None
            self._synced = None
            self.guard(dict(self.vnis))

    def sync(self, hosts: dict[str, HostRecord], vnis: dict[int, str]) -> bool:
        """Bring states and policies in line with the live hosts; returns whether what this host publishes
        (`seen`, or the keys it may publish) changed."""
        with self._lock:
            self.guard(vnis)
            self._hosts = hosts
            before = (dict(self.seen), set(self._ready), set(self._ready_peers))
            if not vnis:
                self._clear()
                self._ready = set(self.keyring.pairs)  # nothing to install before publishing
                self._ready_peers = set()
                self.keyring.forget_nonces(set())
                return before != (self.seen, self._ready, self._ready_peers)
            fingerprint = (sorted((n, r.vtep, sorted(r.public_keys.items()), r.key_mac, r.seen.get(self.host),
                                   r.nonces.get(self.host)) for n, r in hosts.items()),
                           sorted(self.keyring.pairs), self.vtep())
            if fingerprint == self._synced:
                return False  # nothing that decides states or policies changed
            me = self.vtep()
            want_states: dict[State, SAKey] = {}
            want_policies: set[Policy] = set()
            seen: dict[str, int] = {}
            # A peer whose inbound side we create from scratch (none in the kernel) gets a fresh nonce.
            have_states = set(self.ipsec.states())  # one read per sync, for the nonces and the diff
            inbound_from = {st.src for st in have_states if st.dst == me}
            self.keyring.forget_nonces(set(hosts))
            for name, rec in hosts.items():
                if name == self.host:
                    continue
                peer_keys = {int(e): k for e, k in (rec.public_keys or {}).items()}
                problem = "it publishes no public key (an older pyoverlay?)" if not peer_keys else verify(
                    self.secret, rec.host, rec.vtep, peer_keys, rec.key_mac)
                if problem:
                    if self.refused.get(name) != problem:
                        log.error("host %s: %s; encrypted traffic to and from it is dropped", name, problem)
                    self.refused[name] = problem
                    continue
                self.refused.pop(name, None)
                if name not in self.keyring.nonces or rec.vtep not in inbound_from:
                    self.keyring.new_nonce(name)
                states = self._peer_states(me, name, rec, peer_keys, want_states)
                for sa in states:
                    want_states[State(sa.src, sa.dst, sa.spi)] = sa
                if any(sa.src == me for sa in states):
                    want_policies.add(Policy(me, rec.vtep, self.port))
                seen[name] = max(peer_keys)
            failed = self._apply(want_states, want_policies, have_states)
            for name, rec in hosts.items():
                if rec.vtep in failed:
                    # Only this peer is affected: its encrypted traffic is blocked (catch-all), the others go on.
                    problem = f"installing its SAs or policy failed ({failed[rec.vtep]})"
                    if self.refused.get(name) != problem:
                        log.error("host %s: %s; encrypted traffic to and from it is dropped", name, problem)
                    self.refused[name] = problem
                    seen.pop(name, None)
            self._want_policies = want_policies
            self.seen = seen
            self._ready = set(self.keyring.pairs)
            self._ready_peers = set(seen)
            self._synced = None if failed else fingerprint  # a failed peer is retried at the next sync
            return before != (self.seen, self._ready, self._ready_peers)

    def _peer_states(self, me: str, name: str, rec: HostRecord, peer_keys: dict[int, str],
                     taken: dict[State, SAKey]) -> list[SAKey]:
        """Inbound states for every pair of epochs (under our nonce for this peer, a new one if an SPI
        collides with another inbound state), and the outbound state once the peer has published its nonce
        for us (that is, once its inbound side exists)."""
        mine = sorted(self.keyring.pairs)
        taken_spis = {st.spi for st in taken if st.dst == me}
        for _ in range(4):
            nonce = self.keyring.nonces[name]
            inbound = [derive(self.keyring.shared(a, pub), rec.vtep, me, b, a, self.key_bits, nonce)
                       for a in mine for b, pub in peer_keys.items()]
            spis = [sa.spi for sa in inbound]
            if len(set(spis)) == len(spis) and not taken_spis & set(spis):
                break
            log.warning("host %s: an SPI of its inbound SAs collides with another; deriving them again", name)
            self.keyring.new_nonce(name)
        out = inbound
        theirs = (rec.nonces or {}).get(self.host)
        if theirs is None:
            return out  # it has not installed its side for us yet: nothing sent to it (the catch-all blocks)
        # Send with our newest epoch once the peer has its inbound side, else with the one before.
        acked = (rec.seen or {}).get(self.host, 0)
        send = mine[-1] if acked >= mine[-1] or len(mine) == 1 else mine[-2]
        newest = max(peer_keys)
        out.append(derive(self.keyring.shared(send, peer_keys[newest]), me, rec.vtep, send, newest, self.key_bits,
                          theirs))
        return out

    def _apply(self, want_states: dict[State, SAKey], want_policies: set[Policy],
               have_states: set[State]) -> dict[str, str]:
        """Program states and policies; returns peer VTEP -> what failed for it (nothing else stops)."""
        self._clean = False
        have_policies = set(self.ipsec.policies())
        add = [sa for st, sa in want_states.items() if st not in have_states]
        gone = sorted(have_states - set(want_states), key=lambda st: (st.src, st.dst, st.spi))
        # One batch, new states first: make before break.
        me = self.vtep()
        failures = self.ipsec.apply(add, sorted(want_policies - have_policies, key=str),
                                    sorted(have_policies - want_policies, key=str), gone)
        failed = {(dst if src == me else src): why for src, dst, why in failures}
        for sa in add:
            if sa.src == me:
                log.info("sending to %s with epochs %d>%d (spi %#x)", sa.dst, sa.src_epoch, sa.dst_epoch, sa.spi)
        if gone:
            log.info("removed %d ESP states: %s", len(gone), ", ".join(f"{s.src}>{s.dst} {s.spi:#x}" for s in gone))
        return failed

    def _clear(self) -> None:
        if self._clean:
            return
        self.ipsec.apply([], [], self.ipsec.policies(), self.ipsec.states())
        self.seen = {}
        self._clean = True
        self._synced = None
