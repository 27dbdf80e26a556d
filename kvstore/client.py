"""The one module that talks to etcd (v3).

Everything else in pyoverlay sees typed records and a handful of operations: read, prefix read,
create-if-absent, compare-and-swap, delete, transactions, leases and prefix watches that resume from a
revision and resynchronise after compaction. Every call is bounded by a timeout so a plugin call never
hangs on a slow or absent etcd, and several endpoints are tried in turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

# First: etcd's messages in today's protobuf form, where etcd3 will look for its own (kvstore/etcdrpc).
import kvstore.etcdrpc  # noqa: F401

# isort: split
import etcd3
import etcd3.exceptions as etcd_exc
import grpc
from etcd3 import transactions as tx
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from kvstore.base import KV, Compacted, Put, SnapshotFirst, StoreError, StoreUnavailable, Txn, WatchAnswer, WatchEvent
from kvstore.config import EtcdConfig
from kvstore.gateway import GatewayMissing, GatewayWatch, MemberLost

__all__ = ["KV", "Compacted", "KVStore", "PrefixWatch", "StoreError", "StoreUnavailable", "Txn", "WatchEvent"]

log = logging.getLogger(__name__)

# grpc's Python layer waits for a stream's next message in slices of this many seconds (0.1 by default) so
# that a blocked main thread still runs signal handlers (grpc/grpc#19464). Our streams (the watches) are read
# on worker threads, where the slices only wake each idle watch ten times a second: measured, most of an
# idle plugin's system calls, and on a slow kernel (the user-mode-linux guest) a large share of its CPU. A
# waiter is still woken at once by a message, a cancel or an error; only the idle polling slows down.
if hasattr(grpc, "_common") and isinstance(getattr(grpc._common, "MAXIMUM_WAIT_TIMEOUT", None), float):
    grpc._common.MAXIMUM_WAIT_TIMEOUT = 2.0

T = TypeVar("T")

# Short reconnect backoff: after an outage the first call should find etcd again within a second or two,
# not after gRPC's default exponential backoff of up to two minutes.
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 300),
    ("grpc.min_reconnect_backoff_ms", 300),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A watch on a member that was cut off is noticed within about 7 s and moves to another member (etcd
    # refuses pings more often than every 5 s: --grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    # One watch answer carries every event of one revision: a transaction that releases a departed host's
    # thousands of endpoints is one such answer, far above gRPC's default 4 MiB.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
RANGE_PAGE = 1000  # keys per range request
REQUIRE_LEADER = ("hasleader", "true")
FAILED_FOR = 10.0  # seconds an endpoint that failed is passed over while others remain


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(errors="replace"),   # an undecodable key must not stop a read: no record has it
        value=bytes(raw.value),
        mod_revision=raw.mod_revision,
        create_revision=raw.create_revision,
        version=raw.version,
        lease=raw.lease,
    )


def prefix_end(prefix: str) -> bytes:
    return etcd3.utils.increment_last_byte(prefix.encode())


class KVStore:
    """Thread-safe etcd v3 access with timeouts and endpoint failover."""

    def __init__(self, config: EtcdConfig, observe: Callable[[str, float, bool], None] | None = None,
                 health_key: str = "health") -> None:
        if not config.endpoints:
            raise ValueError("no etcd endpoints configured")
        self.config = config
        self._lock = threading.Lock()
        self._client: etcd3.Etcd3Client | None = None
        self._endpoint = ""                          # the current client's
        self._index = 0
        self.gateway: bool | None = None             # watches through etcd's JSON gateway (None: not tried yet)
        self._failed_until: dict[int, float] = {}   # endpoint index -> skipped until (monotonic)
        self._observe = observe or (lambda op, seconds, ok: None)
        # Read by health(): under pyoverlay's prefix, as an etcd user limited to it may read nothing else.
        self.health_key = health_key

    # -- connection handling -------------------------------------------------------------------------

    def _connect(self, endpoint: str) -> etcd3.Etcd3Client:
        if endpoint.startswith("unix:"):
            # unix:/path/name:port (the embedded etcd): gRPC's own target syntax, which etcd3 forms as host:port
            path, _, socket_port = endpoint.rpartition(":")
            return etcd3.client(host=path, port=int(socket_port), timeout=self.config.timeout,
                                user=self.config.username, password=self.config.password, grpc_options=_GRPC_OPTIONS)
        host, port, tls = self.config.member(endpoint)
        if tls and not self.config.cacert:
            raise StoreUnavailable(f"etcd at {endpoint} uses TLS but ETCD_CACERT is not set (the CA certificate that "
                                   f"signed etcd's server certificate)")
        return etcd3.client(
            host=host,
            port=port,
            ca_cert=self.config.cacert if tls else None,
            cert_key=self.config.key if tls else None,
            cert_cert=self.config.cert if tls else None,
            timeout=self.config.timeout,
            user=self.config.username,
            password=self.config.password,
            grpc_options=_GRPC_OPTIONS,
        )

    def _current(self) -> etcd3.Etcd3Client:
        with self._lock:
            if self._client is None:
                # Skip members that failed a moment ago (a cut-off one costs a whole timeout per try), unless
                # every one did.
                now, n = time.monotonic(), len(self.config.endpoints)
                for _ in range(n):
                    if self._failed_until.get(self._index % n, 0.0) <= now:
                        break
                    self._index += 1
                endpoint = self.config.endpoints[self._index % n]
                try:
                    self._client, self._endpoint = self._connect(endpoint), endpoint
                    # Every request requires a leader (etcd's WithRequireLeader): a member cut off from the
                    # majority answers "no leader" at once, and the call moves on to the next member, instead
                    # of waiting out its request timeout.
                    self._client.metadata = (*(self._client.metadata or ()), REQUIRE_LEADER)
                except (grpc.RpcError, etcd_exc.Etcd3Exception) as err:
                    # Authentication happens while connecting: an unreachable endpoint fails here.
                    self._failed_until[self._index % n] = now + FAILED_FOR
                    self._index += 1
                    raise StoreUnavailable(f"etcd at {endpoint} unreachable: {_describe(err)}") from err
            return self._client

    def _drop(self, client: etcd3.Etcd3Client) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
                self._failed_until[self._index % len(self.config.endpoints)] = time.monotonic() + FAILED_FOR
                self._index += 1
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing a broken channel may fail in many ways
            pass

    def _call(self, op: str, fn: Callable[[etcd3.Etcd3Client], T]) -> T:
        """Run fn against etcd, failing over across endpoints until the deadline."""
        deadline = time.monotonic() + self.config.timeout * max(1, len(self.config.endpoints))
        last: Exception | None = None
        start = time.perf_counter()
        for _ in range(max(2, len(self.config.endpoints) + 1)):
            if time.monotonic() > deadline:
                break
            try:
                client = self._current()
            except StoreUnavailable as err:
                last = err
                continue
            try:
                result = fn(client)
                self._observe(op, time.perf_counter() - start, True)
                return result
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as err:
                last = err
                self._drop(client)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    # An expired auth token or a dead endpoint: reconnect (re-authenticates) and retry. CANCELLED:
                    # another thread dropped this channel (its member failed) while the call was on it.
                    last = err
                    self._drop(client)
                    continue
                self._observe(op, time.perf_counter() - start, False)
                raise StoreError(f"etcd {op} failed: {_describe(err)}") from err
            except Exception as err:  # noqa: BLE001 - re-raised unless the channel was closed under the call
                # Another thread's failover (_drop) closed this client's channel during the call. grpc says so
                # in more than one way (ValueError "Cannot invoke RPC on closed channel!", errors through
                # etcd3's wrappers): whatever it raised, the call goes to the member that is current now.
                with self._lock:
                    if self._client is client:
                        raise
                last = err
                continue
        self._observe(op, time.perf_counter() - start, False)
        raise StoreUnavailable(
            f"etcd unreachable ({', '.join(self.config.endpoints)}): {_describe(last)}"
        )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- reads ------------------------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        def run(c: etcd3.Etcd3Client) -> KV | None:
            resp = c.get_response(key)
            return _kv(resp.kvs[0]) if resp.kvs else None

        return self._call("get", run)

    def range(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]:
        """All keys under prefix, and the store revision they were read at."""

        def run(c: etcd3.Etcd3Client) -> tuple[list[KV], int]:
            # In pages, all at the revision of the first: a prefix of any size is read whole and consistent,
            # each answer far below gRPC's message limit (20,000 endpoint records weigh about 9 MB).
            out: list[KV] = []
            start, revision = prefix.encode(), 0
            while True:
                req = rpc.RangeRequest(key=start, range_end=prefix_end(prefix), keys_only=keys_only,
                                       limit=RANGE_PAGE, revision=revision)
                resp = c.kvstub.Range(req, c.timeout, credentials=c.call_credentials, metadata=c.metadata)
                out += [_kv(k) for k in resp.kvs]
                revision = revision or resp.header.revision
                if not resp.more or not resp.kvs:
                    return out, revision
                start = resp.kvs[-1].key + b"\0"

        return self._call("range", run)

    def health(self) -> float:
        """Round trip to etcd in seconds (raises StoreUnavailable)."""
        start = time.perf_counter()
        self._call("health", lambda c: c.get_response(self.health_key))
        return time.perf_counter() - start

    # -- writes -----------------------------------------------------------------------------------------

    def put(self, key: str, value: bytes | str, lease: int | None = None) -> int:
        def run(c: etcd3.Etcd3Client) -> int:
            return int(c.put(key, value, lease=lease).header.revision)

        return self._call("put", run)

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", lambda c: c.delete(key)))

    def delete_prefix(self, prefix: str) -> int:
        return int(self._call("delete", lambda c: c.delete_prefix(prefix).deleted))

    def commit(self, txn: Txn) -> bool:
        """Run a transaction; True when every comparison held and the success branch ran."""

        compare = [(tx.Version(c.key) if c.target == "version" else tx.Mod(c.key)) == c.value for c in txn.compare]
        success = [tx.Put(op.key, op.value, lease=op.lease) if isinstance(op, Put) else
                   tx.Delete(op.key, range_end=prefix_end(op.key) if op.prefix else None)
                   for op in txn.success]

        def run(c: etcd3.Etcd3Client) -> bool:
            ok, _ = c.transaction(compare=compare, success=success, failure=[])
            return bool(ok)

        return self._call("txn", run)

    def create(self, key: str, value: bytes | str, lease: int | None = None) -> bool:
        """Create key unless it exists (never read-then-write).

        A create whose first try committed but whose answer was lost (retried on another connection) finds
        its own value there: that counts as created. Callers that put a request id in the value thus never
        leak what they created, nor mistake it for someone else's.
        """
        raw = value.encode() if isinstance(value, str) else value

        def run(c: etcd3.Etcd3Client) -> bool:
            ok, resps = c.transaction(compare=[tx.Version(key) == 0], success=[tx.Put(key, raw, lease=lease)],
                                      failure=[tx.Get(key)])
            if ok:
                return True
            found = resps[0] if resps else []
            return bool(found) and bytes(found[0][0]) == raw

        return self._call("txn", run)

    def swap(self, key: str, value: bytes | str, mod_revision: int) -> bool:
        """Replace key only if nobody changed it since mod_revision."""
        return self.commit(Txn().unchanged(key, mod_revision).put(key, value))

    # -- leases -----------------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self._call("lease", lambda c: c.lease(ttl).id))

    def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; returns its remaining TTL (0 or less when it already expired)."""

        def run(c: etcd3.Etcd3Client) -> int:
            resps = list(c.refresh_lease(lease_id))
            return int(resps[0].TTL) if resps else 0

        return self._call("lease", run)

    def revoke(self, lease_id: int) -> None:
        self._call("lease", lambda c: c.revoke_lease(lease_id))

    # -- watches ----------------------------------------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        on_snapshot: Callable[[list[KV], int], None],
        on_events: Callable[[list[WatchEvent]], None],
        on_error: Callable[[Exception], None] | None = None,
    ) -> PrefixWatch:
        """Follow every key under prefix: a full snapshot first, then events from the next revision.

        After a disconnect the watch resumes from the last revision seen; if that revision was compacted
        meanwhile it takes a new snapshot, so the consumer never misses a change.
        """
        w = PrefixWatch(self, prefix, on_snapshot, on_events, on_error)
        w.start()
        return w

    def _watch_stream(self, prefix: str, start_revision: int
                      ) -> tuple[Iterable[WatchAnswer], Callable[[], None], etcd3.Etcd3Client]:
        """A watch of prefix from start_revision on the current member: through its JSON gateway (less than half
        of gRPC's CPU per event: kvstore/gateway.py), or gRPC's stream where the gateway is off."""
        client = self._current()
        with self._lock:
            endpoint = self._endpoint if self._client is client else ""
        if endpoint and self.gateway is not False:
            try:
                watch = GatewayWatch(endpoint, self.config, client.metadata, prefix.encode(), prefix_end(prefix),
                                     start_revision)
                self.gateway = True
                return watch, watch.cancel, client
            except GatewayMissing as err:
                log.info("%s; watching through gRPC's stream", err)
                self.gateway = False
            except MemberLost:
                self._drop(client)   # unreachable, or refused us: the next try goes to another member
                raise
        create = rpc.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_end(prefix), start_revision=start_revision,
            progress_notify=True,
        )
        stub = rpc_grpc.WatchStub(client.channel)
        stop = threading.Event()

        def requests() -> Iterable[Any]:
            yield rpc.WatchRequest(create_request=create)
            stop.wait()

        # The client's metadata requires a leader (see _current): a member cut off from the majority ends the
        # stream instead of keeping it open with nothing to say; the watch then moves to another member.
        call = stub.Watch(requests(), credentials=client.call_credentials, metadata=client.metadata)

        def cancel() -> None:
            stop.set()
            call.cancel()

        return (_answer(resp) for resp in call), cancel, client


def _answer(resp: Any) -> WatchAnswer:
    """gRPC's WatchResponse as a WatchAnswer."""
    return WatchAnswer(
        events=[WatchEvent(kind="delete" if ev.type == ev.DELETE else "put", key=ev.kv.key.decode(errors="replace"),
                           value=bytes(ev.kv.value), mod_revision=ev.kv.mod_revision) for ev in resp.events],
        revision=resp.header.revision, created=resp.created, compact_revision=resp.compact_revision,
        canceled=resp.canceled, cancel_reason=resp.cancel_reason)


class PrefixWatch(SnapshotFirst):
    """A background thread following one prefix (see KVStore.watch_prefix)."""

    store: KVStore

    def __init__(self, store: KVStore, prefix: str, on_snapshot: Callable[[list[KV], int], None],
                 on_events: Callable[[list[WatchEvent]], None],
                 on_error: Callable[[Exception], None] | None) -> None:
        self.store = store
        self.prefix = prefix
        self.on_snapshot = on_snapshot
        self.on_events = on_events
        self.on_error = on_error or (lambda e: log.warning("watch %s: %s", prefix, e))
        self.revision = 0  # next revision to receive; 0 = snapshot needed
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._cancel: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch:{prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._cancel:
            self._cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._snapshot_if_needed()
                self._follow()
                backoff = 0.1
            except Compacted as err:
                log.info("watch %s: %s; resynchronising", self.prefix, err)
                self.revision = 0
            except Exception as err:  # noqa: BLE001 - any failure: report, back off, resume
                if self._stop.is_set():
                    return
                self.on_error(err)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _follow(self) -> None:
        try:
            stream, cancel, client = self.store._watch_stream(self.prefix, self.revision)
        except grpc.RpcError as err:
            raise StoreUnavailable(_describe(err)) from err
        self._cancel = cancel
        try:
            for resp in stream:
                if self._stop.is_set():
                    return
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.created:
                    continue  # its header revision is "now", not what we have received
                if resp.canceled:
                    raise StoreUnavailable(f"watch canceled by etcd: {resp.cancel_reason}")
                if resp.events:
                    self.on_events(resp.events)
                    self.revision = resp.events[-1].mod_revision + 1
                elif resp.revision >= self.revision:
                    self.revision = resp.revision + 1  # progress notification
        except MemberLost:
            if self._stop.is_set():
                return
            self.store._drop(client)   # that member is gone, without a leader, or refused our token
            raise
        except grpc.RpcError as err:
            if self._stop.is_set():
                return
            if (err.code() if hasattr(err, "code") else None) == grpc.StatusCode.UNAVAILABLE:
                self.store._drop(client)   # that member is gone or without a leader: try the next
            raise StoreUnavailable(_describe(err)) from err
        finally:
            cancel()
            self._cancel = None
        raise StoreUnavailable("watch stream ended")


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "no endpoint answered"
    text = str(err) or type(err).__name__
    if isinstance(err, grpc.RpcError) and hasattr(err, "details"):
        try:
            text = f"{err.code().name}: {err.details()}"
        except Exception:  # noqa: BLE001
            pass
    if any(marker in text for marker in ("TSI_", "SSL", "ssl", "handshake", "certificate")):
        text += " (the TLS handshake failed: check ETCD_CACERT, ETCD_CERT and ETCD_KEY against etcd's CA)"
    return text
