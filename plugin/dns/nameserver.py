"""Names across hosts: a DNS server fed from etcd, on every pyoverlay network of this host.

Docker's embedded DNS (127.0.0.11) knows only the containers of its own host. It forwards every name it
does not know to the container's external DNS servers (daemon.json's "dns", or --dns), from inside the
container's namespace. This server is where those queries land:

- on the host-wide DNS address (PYOVERLAY_DNS_ADDRESS, 169.254.53.53), named once in daemon.json's "dns":
  each pyoverlay network's namespace holds it, and Join routes it through the network's gateway, so
  `docker run --network appnet` with no flag asks the network's own server; the host namespace holds it too,
  for every other container (default bridge, other drivers), and only forwards there;
- on each network's gateway address, for containers started with `--dns <gateway>`;
- the gateway address (and a fixed MAC) and the DNS address sit on the network's bridge in its namespace
  on every host, so the query never leaves the host; this server's sockets are bound there (UDP + TCP);
- it answers A/AAAA/PTR for the containers of that network on every live host: their container names
  (from the endpoint records) and their aliases (`--network-alias`, short IDs; AliasRecord, written by
  plugin/docker/aliases.py), case-insensitively, with a short TTL so a moved or removed name is not cached;
- anything else is forwarded to this host's own resolvers (PYOVERLAY_DNS_UPSTREAMS, else the host's
  /etc/resolv.conf), so other names resolve exactly as before; never from an `--internal` network, whose
  containers must have no way out (REFUSED).

Containers are not trusted: the work they can cause is bounded. One selector thread reads every socket and
answers the network's own names itself (a dictionary look-up, so names keep answering during a flood);
only forwarding, which blocks on upstreams, goes to a fixed pool of workers. Each source address gets RATE
queries a second (BURST at once) and at most PER_SOURCE queries waiting upstream, MAX_PENDING in all; at
most MAX_TCP connections are served at a time, each closed after TCP_IDLE seconds of silence. What exceeds
a bound is dropped (UDP: the client retries) or closed, and counted. UDP answers larger than the client
takes are truncated (TC set).
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset

from kvstore.records import AliasRecord, RemoteEndpoint
from plugin import metrics
from plugin.kernel import netns

log = logging.getLogger(__name__)

TTL = 1                # seconds: names follow containers that move; resolvers must not keep them long
UPSTREAM_TIMEOUT = 2.0
PORT = 53
WORKERS = 16           # threads forwarding queries upstream (all networks together)
MAX_PENDING = 256      # queries waiting for an upstream; more are dropped
PER_SOURCE = 4         # of those, from one source address: a flooder holds at most this many workers
RATE, BURST = 200.0, 400.0  # per source address: queries a second, and at once
MAX_TCP = 16           # TCP connections served at once; more are closed at accept
TCP_IDLE = 5.0         # seconds a TCP connection may stay silent
MAX_SOURCES = 4096     # rate-limit buckets kept; the oldest go first
HOST_NAMESPACE = ""    # a listener's namespace path: the plugin's own (the host's)
FORWARD_ONLY = ""      # a listener's network key: no network's names, everything forwarded


class RateLimit:
    """A token bucket per source address, in bounded memory."""

    def __init__(self, rate: float = RATE, burst: float = BURST, sources: int = MAX_SOURCES) -> None:
        self.rate, self.burst, self.sources = rate, burst, sources
        self._buckets: dict[str, tuple[float, float]] = {}   # source -> (tokens, at); insertion order = age

    def allow(self, source: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.sources:
            self._buckets.pop(next(iter(self._buckets)))
        return allowed


def udp_payload(query: dns.message.Message) -> int:
    """How large a UDP answer the client takes: 512, or its EDNS payload size (at most 4096)."""
    return max(512, min(4096, query.payload)) if query.edns >= 0 else 512


def to_wire(reply: dns.message.Message, query: dns.message.Message, limit: int) -> bytes:
    """The reply in at most limit bytes; one that does not fit goes out empty with TC set (retry over TCP)."""
    try:
        return reply.to_wire(max_size=limit)
    except dns.exception.TooBig:
        short = dns.message.make_response(query, recursion_available=True)
        short.set_rcode(reply.rcode())
        short.flags |= dns.flags.TC
        return short.to_wire(max_size=limit)


# One value bare, several in a tuple: nearly every name has one address and every address one name, and a
# 1-tuple is 48 bytes more, twice per endpoint (a set or frozenset of one would be 216).
Values = str | tuple[str, ...]


def _values(held: Values | None) -> tuple[str, ...]:
    return () if held is None else (held,) if isinstance(held, str) else held


@dataclass
class Zone:
    """The names of one network: name -> addresses, address -> names.

    The values are replaced, never changed in place: the serving thread reads them while a change is being
    applied, and sees each name's old or new addresses, never a half-made change.
    A pair two endpoints give (a container moving between hosts has a record on each for a moment) is held
    twice, and stays until neither gives it: the values count, answers show each once."""
    forward: dict[str, Values] = field(default_factory=dict)
    reverse: dict[str, Values] = field(default_factory=dict)

    def addresses(self, name: str) -> tuple[str, ...]:
        return _values(self.forward.get(name))

    def names(self, address: str) -> tuple[str, ...]:
        return _values(self.reverse.get(address))

    def add(self, name: str, address: str) -> None:
        name = _name(name)
        if name:
            for table, k, v in ((self.forward, name, address), (self.reverse, address, name)):
                have = table.get(k)
                table[k] = v if have is None else (*_values(have), v)

    def discard(self, name: str, address: str) -> None:
        """One giver of the pair less."""
        name = _name(name)
        for table, k, v in ((self.forward, name, address), (self.reverse, address, name)):
            have = _values(table.get(k))
            if v in have:
                at = have.index(v)
                rest = have[:at] + have[at + 1:]
                if rest:
                    table[k] = rest[0] if len(rest) == 1 else rest
                else:
                    del table[k]


def _name(name: str) -> str:
    plain = name.strip().rstrip(".").lower()
    return name if plain == name else plain   # the record's own string when it is already plain: one copy


# What one endpoint puts in its network's zone, flat: (network key, name, address, name, address, ...). One
# tuple of strings the record holds (64 bytes for one name), where nested pairs took 160.
Names = tuple[str, ...]


def endpoint_names(ep: RemoteEndpoint, docker_names: list[str] | None) -> Names:
    """What Docker says now (a rename, aliases) wins over the name given at CreateEndpoint."""
    names = [n for n in map(_name, docker_names or ([ep.name] if ep.name else [])) if n]
    return (ep.network_key, *(x for ip in (ep.ip, ep.ip6) if ip for name in names for x in (name, ip)))


class NameIndex:
    """Every network's zone, kept current endpoint by endpoint: a change costs that endpoint's names, not
    everyone's. Two endpoints may give the same name and address (a container moving between hosts has a
    record on each for a moment); the pair stays until neither gives it (see Zone)."""

    def __init__(self) -> None:
        self.zones: dict[str, Zone] = {}
        self._of: dict[str, Names] = {}                   # endpoint key -> what it gave

    def set(self, key: str, names: Names | None) -> None:
        """The endpoint's names now (None: it gives none: gone, or its host is not live)."""
        old = self._of.pop(key, None)
        if old == names:
            if names is not None:
                self._of[key] = names
            return
        if old is not None:
            gone = self.zones[old[0]]
            for at in range(1, len(old), 2):
                gone.discard(old[at], old[at + 1])
        if names is not None:
            self._of[key] = names
            zone = self.zones.get(names[0]) or self.zones.setdefault(names[0], Zone())
            for at in range(1, len(names), 2):
                zone.add(names[at], names[at + 1])


def build_zones(endpoints: Iterable[RemoteEndpoint], live_hosts: set[str],
                aliases: Iterable[AliasRecord]) -> dict[str, Zone]:
    """Network key -> its names, from the endpoint records of live hosts and their aliases."""
    docker_names = {al.endpoint_id: al.names for al in aliases}
    index = NameIndex()
    for i, ep in enumerate(endpoints):
        if ep.host in live_hosts:
            index.set(str(i), endpoint_names(ep, docker_names.get(ep.endpoint_id)))
    return index.zones


def answer(query: dns.message.Message, zone: Zone | None) -> dns.message.Message | None:
    """The answer from the network's own names, or None when the name is not one of them (forward it)."""
    if zone is None or len(query.question) != 1:
        return None
    q = query.question[0]
    if q.rdclass != dns.rdataclass.IN:
        return None
    text = q.name.to_text(omit_final_dot=True).lower()
    reply = dns.message.make_response(query, recursion_available=True)
    reply.flags |= dns.flags.AA
    if q.rdtype == dns.rdatatype.PTR:
        try:
            address = dns.reversename.to_address(q.name)
        except (dns.exception.SyntaxError, ValueError):
            return None
        names = zone.names(str(ipaddress.ip_address(address)))
        if not names:
            return None
        reply.answer.append(dns.rrset.from_text_list(q.name, TTL, "IN", "PTR", [f"{n}." for n in sorted(set(names))]))
        return reply
    addresses = zone.addresses(text)
    if not addresses:
        return None
    family = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(q.rdtype)
    matching = sorted({a for a in addresses if ipaddress.ip_address(a).version == family})
    if matching:
        rdtype = "A" if family == 4 else "AAAA"
        reply.answer.append(dns.rrset.from_text_list(q.name, TTL, "IN", rdtype, matching))
    return reply  # a known name without this record type: NOERROR, no data (not NXDOMAIN)


def upstreams_from_host() -> list[str]:
    try:
        return [str(s) for s in dns.resolver.Resolver(configure=True).nameservers]
    except (dns.resolver.NoResolverConfiguration, OSError):
        return []


@dataclass
class _Listener:
    nkey: str
    address: str
    udp: socket.socket
    tcp: socket.socket
    internal: bool = False   # an --internal network: no forwarding


class NameServer:
    """One thread serving every local network's gateway sockets; zones are swapped in whole."""

    def __init__(self, upstreams: list[str] | None, exclude: list[str] | None = None) -> None:
        # Never forward to ourselves (a host whose resolv.conf names the DNS address we serve).
        self.upstreams = [u for u in (upstreams or upstreams_from_host()) if u not in (exclude or [])]
        self.zones: dict[str, Zone] = {}
        self.queries = 0
        self.dropped = 0                     # queries refused by a bound (rate, pending, TCP slots)
        self._workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="dns")
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._tcp_slots = threading.BoundedSemaphore(MAX_TCP)
        self._tcp_workers = ThreadPoolExecutor(MAX_TCP, thread_name_prefix="dns-tcp")
        self._rate = RateLimit()
        self._in_flight: dict[str, int] = {}   # source -> its queries accepted, not yet answered
        self._in_flight_lock = threading.Lock()
        self._listeners: dict[tuple[str, str], _Listener] = {}   # (netns path, address) -> sockets
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._tcp_workers.shutdown(wait=False, cancel_futures=True)
        for key in list(self._listeners):
            self._close(key)

    def set_zones(self, zones: dict[str, Zone]) -> None:
        self.zones = zones  # one assignment: the serving thread sees the old or the new, never a mix

    # -- sockets ----------------------------------------------------------------------------------------

    def serve_networks(self, wanted: dict[tuple[str, str], tuple[str, bool]]) -> None:
        """Listen on exactly these (namespace path, gateway address) -> (network key, internal); idempotent."""
        with self._lock:
            for key in set(self._listeners) - set(wanted):
                self._close(key)
            for key, (nkey, internal) in wanted.items():
                if key in self._listeners:
                    self._listeners[key].nkey = nkey
                    self._listeners[key].internal = internal
                    continue
                try:
                    self._open(key, nkey, internal)
                except OSError as err:
                    log.error("DNS for network %s on %s: %s; names on other hosts will not resolve there",
                              nkey, key[1], err)
        self._wake_w.send(b"x")

    def _open(self, key: tuple[str, str], nkey: str, internal: bool) -> None:
        path, address = key
        family = socket.AF_INET6 if ":" in address else socket.AF_INET

        def make() -> tuple[socket.socket, socket.socket]:
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            for s in (udp, tcp):
                # The address may be added to the bridge a moment later (or be moving): bind anyway.
                s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND (IPv6 sockets honour it too)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, PORT))
                s.setblocking(False)
            tcp.listen(64)
            return udp, tcp

        udp, tcp = make() if path == HOST_NAMESPACE else netns.run_in(Path(path), make)
        listener = _Listener(nkey, address, udp, tcp, internal)
        self._listeners[key] = listener
        self._selector.register(udp, selectors.EVENT_READ, listener)
        self._selector.register(tcp, selectors.EVENT_READ, listener)
        log.info("DNS for network %s on %s:%d", nkey, address, PORT)

    def _close(self, key: tuple[str, str]) -> None:
        listener = self._listeners.pop(key, None)
        if listener is None:
            return
        for s in (listener.udp, listener.tcp):
            try:
                self._selector.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def serving(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted((lst.nkey, lst.address) for lst in self._listeners.values())

    # -- serving ----------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._selector.select(timeout=1.0)
            except (OSError, ValueError):
                continue  # a socket closed under us by serve_networks
            for sel_key, _ in events:
                if sel_key.data is None:
                    self._wake_r.recv(64)
                    continue
                listener: _Listener = sel_key.data
                sock = sel_key.fileobj
                try:
                    if sock is listener.udp:
                        self._take_udp(listener)
                    else:
                        self._take_tcp(listener)
                except (OSError, RuntimeError):  # RuntimeError: the pools were shut down (stopping)
                    continue

    def _drop(self) -> None:
        self.dropped += 1
        metrics.DNS_DROPPED.inc()

    def _admit(self, source: str) -> bool:
        with self._in_flight_lock:
            if self._in_flight.get(source, 0) >= PER_SOURCE or not self._pending.acquire(blocking=False):
                return False
            self._in_flight[source] = self._in_flight.get(source, 0) + 1
            return True

    def _done(self, source: str) -> None:
        with self._in_flight_lock:
            left = self._in_flight.pop(source, 1) - 1
            if left > 0:
                self._in_flight[source] = left
            self._pending.release()

    def _take_udp(self, listener: _Listener) -> None:
        data, peer = listener.udp.recvfrom(4096)
        if not self._rate.allow(peer[0]):
            self._drop()
            return
        query = self._parse(data)
        if query is None:
            return
        reply = self._local(query, listener.nkey, False, listener.internal)
        if reply is not None:
            listener.udp.sendto(reply, peer)
            return
        if not self._admit(peer[0]):
            self._drop()
            return
        try:
            self._workers.submit(self._udp_forward, listener, query, peer)
        except RuntimeError:
            self._done(peer[0])
            raise

    def _take_tcp(self, listener: _Listener) -> None:
        conn, peer = listener.tcp.accept()
        if not self._rate.allow(peer[0]) or not self._tcp_slots.acquire(blocking=False):
            self._drop()
            conn.close()
            return
        try:
            self._tcp_workers.submit(self._tcp, listener, conn)
        except RuntimeError:
            self._tcp_slots.release()
            conn.close()
            raise

    def _udp_forward(self, listener: _Listener, query: dns.message.Message, peer: tuple[str, int]) -> None:
        try:
            metrics.DNS_QUERIES.labels("forwarded").inc()
            listener.udp.sendto(to_wire(self._forward(query, False), query, udp_payload(query)), peer)
        except OSError as err:
            log.debug("DNS reply to %s: %s", peer, err)
        except Exception:  # noqa: BLE001 - one bad query must not cost a worker
            log.exception("DNS query from %s", peer)
        finally:
            self._done(peer[0])

    def _tcp(self, listener: _Listener, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(TCP_IDLE)
                while True:
                    head = _recv_exact(conn, 2)
                    if not head:
                        return
                    data = _recv_exact(conn, struct.unpack("!H", head)[0])
                    reply = self.resolve(data, listener.nkey, tcp=True, internal=listener.internal)
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        except Exception:  # noqa: BLE001
            log.exception("DNS over TCP")
        finally:
            self._tcp_slots.release()

    def _parse(self, data: bytes) -> dns.message.Message | None:
        self.queries += 1
        try:
            return dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - anything malformed is dropped, as resolvers do
            return None

    def _local(self, query: dns.message.Message, nkey: str, tcp: bool, internal: bool) -> bytes | None:
        """The answer from the network's own names (or REFUSED on an --internal network); None: forward."""
        limit = 65535 if tcp else udp_payload(query)
        mine = answer(query, self.zones.get(nkey))
        if mine is not None:
            metrics.DNS_QUERIES.labels("network").inc()
            return to_wire(mine, query, limit)
        if internal:
            # An --internal network has no way out, names included.
            metrics.DNS_QUERIES.labels("refused").inc()
            refused = dns.message.make_response(query, recursion_available=False)
            refused.set_rcode(dns.rcode.REFUSED)
            return to_wire(refused, query, limit)
        return None

    def resolve(self, data: bytes, nkey: str, tcp: bool, internal: bool = False) -> bytes | None:
        """Wire query in, wire reply out (None: unparseable, dropped); forwards in the calling thread."""
        query = self._parse(data)
        if query is None:
            return None
        local = self._local(query, nkey, tcp, internal)
        if local is not None:
            return local
        metrics.DNS_QUERIES.labels("forwarded").inc()
        return to_wire(self._forward(query, tcp), query, 65535 if tcp else udp_payload(query))

    def _forward(self, query: dns.message.Message, tcp: bool) -> dns.message.Message:
        for upstream in self.upstreams:
            try:
                if tcp:
                    return dns.query.tcp(query, upstream, timeout=UPSTREAM_TIMEOUT)
                return dns.query.udp(query, upstream, timeout=UPSTREAM_TIMEOUT, ignore_trailing=True)
            except (OSError, dns.exception.DNSException) as err:
                log.debug("upstream %s: %s", upstream, err)
        reply = dns.message.make_response(query, recursion_available=True)
        reply.set_rcode(dns.rcode.SERVFAIL)
        return reply


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf
