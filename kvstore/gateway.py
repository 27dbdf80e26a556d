"""Prefix watches read through etcd's JSON gateway: the same Watch RPC (POST /v3/watch), as newline-delimited
JSON over one HTTP/1.1 connection, read by the watch's own thread.

Why not gRPC's stream: measured with 2,000 events at 100 a second from one member, in alternating runs of one
KVStore watch each way, grpcio's synchronous stream cost 562-612 us of the process's CPU per event (its
channel-spin thread, the C core's event engine and the reading thread, which hand each message over through
a Python condition); this stream 239-267 us. Every host pays that for every change in the fleet.

The gateway is etcd's own: on by default (3.4+), on the same port, behind the same TLS, with the same
authentication token (the Authorization header) and gRPC metadata (Grpc-Metadata-* headers: the leader
requirement). Where it is switched off (`--enable-grpc-gateway=false`: 404) or will not serve the client (a TLS
client certificate that names a user: 400), GatewayMissing tells the client to keep gRPC's stream
(kvstore/client.py).
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from collections.abc import Iterator

import orjson

from kvstore.base import StoreError, StoreUnavailable, WatchAnswer, WatchEvent
from kvstore.config import EtcdConfig

# A member cut off from us is noticed within about 7 s, as gRPC's keepalive does for its channels: probes after
# 5 s of silence, 2 s apart, one unanswered is enough; TCP_USER_TIMEOUT bounds unacknowledged data the same way.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, USER_TIMEOUT_MS = 5, 2, 1, 7000
READ_SIZE = 256 * 1024


class GatewayMissing(StoreError):
    """The member serves no JSON gateway: watch through gRPC."""


class MemberLost(StoreUnavailable):
    """The member failed (connection refused, reset or silent, no leader, a refused token): try another."""


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the embedded etcd's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(endpoint: str, config: EtcdConfig) -> http.client.HTTPConnection:
    """A connection to the member at endpoint, as kvstore.client connects to it (the same forms and TLS)."""
    if endpoint.startswith("unix:"):
        return _UnixConnection(endpoint.removeprefix("unix:"), config.timeout)
    host, port, tls = config.member(endpoint)
    if tls:
        context = ssl.create_default_context(cafile=config.cacert)
        if config.cert and config.key:
            context.load_cert_chain(config.cert, config.key)
        return http.client.HTTPSConnection(host, port, timeout=config.timeout, context=context)
    return http.client.HTTPConnection(host, port, timeout=config.timeout)


def headers_of(metadata: tuple[tuple[str, str], ...] | None) -> dict[str, str]:
    """gRPC metadata as the gateway takes it: the token as Authorization, the rest as Grpc-Metadata-*."""
    out = {"Content-Type": "application/json"}
    for name, value in metadata or ():
        out["Authorization" if name == "token" else f"Grpc-Metadata-{name}"] = value
    return out


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class GatewayWatch:
    """One watch stream: iterate it for WatchAnswers; cancel() (from any thread) ends it."""

    def __init__(self, endpoint: str, config: EtcdConfig, metadata: tuple[tuple[str, str], ...] | None,
                 key: bytes, range_end: bytes, start_revision: int) -> None:
        self.endpoint = endpoint
        body = {"create_request": {"key": _b64(key), "range_end": _b64(range_end), "progress_notify": True,
                                   **({"start_revision": str(start_revision)} if start_revision else {})}}
        self._conn = _connection(endpoint, config)
        try:
            self._conn.request("POST", "/v3/watch", body=orjson.dumps(body), headers=headers_of(metadata))
            self._response = self._conn.getresponse()
        except ssl.SSLError as err:   # Python's TLS refused what gRPC's may take: let gRPC's stream decide
            self._conn.close()
            raise GatewayMissing(f"etcd at {endpoint}: TLS to its JSON gateway failed ({err})") from err
        except (OSError, http.client.HTTPException) as err:
            self._conn.close()
            raise MemberLost(f"etcd at {endpoint}: {err or type(err).__name__}") from err
        status = self._response.status
        if status != 200:
            text = self._response.read(300).decode(errors="replace")
            self._conn.close()
            if 400 <= status < 500 and status != 401 or status == 501:
                # Switched off (404), or it will not serve this client: etcd's gateway refuses every request
                # that comes with a client certificate naming a user (400), as under --client-cert-auth.
                raise GatewayMissing(f"etcd at {endpoint} does not serve watches through its JSON gateway "
                                     f"({status}: {text.strip()})")
            raise MemberLost(f"etcd at {endpoint}: watch answered {status}: {text}")   # a refused token, a 5xx
        sock = self._conn.sock
        if sock is not None:
            sock.settimeout(None)   # a watch waits for changes as long as there are none
            if sock.family != socket.AF_UNIX:
                for level, option, value in (
                        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
                        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)):
                    sock.setsockopt(level, option, value)

    def cancel(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)   # wakes the thread blocked reading it
            except OSError:
                pass
        self._conn.close()

    def __iter__(self) -> Iterator[WatchAnswer]:
        pending = b""
        while True:
            try:
                data = self._response.read1(READ_SIZE)
            except (OSError, ValueError, http.client.HTTPException) as err:   # ValueError: closed by cancel()
                raise MemberLost(f"etcd at {self.endpoint}: watch stream broke: {err or type(err).__name__}") \
                    from err
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line.strip():
                    yield self._answer(line)

    def _answer(self, line: bytes) -> WatchAnswer:
        try:
            message = orjson.loads(line)
            if "error" in message:   # the RPC failed: no leader, an expired or refused token, ...
                error = message["error"]
                raise MemberLost(f"etcd at {self.endpoint}: watch failed: "
                                 f"{str(error.get('message', error))[:300] if isinstance(error, dict) else error}")
            result = message["result"]
            events = [WatchEvent(kind="delete" if ev.get("type") == "DELETE" else "put",
                                 key=base64.b64decode(ev["kv"]["key"]).decode(errors="replace"),
                                 value=base64.b64decode(ev["kv"].get("value", "")),
                                 mod_revision=int(ev["kv"].get("mod_revision", 0)))
                      for ev in result.get("events", ())]
            return WatchAnswer(events=events, revision=int(result["header"].get("revision", 0)),
                               created=bool(result.get("created")),
                               compact_revision=int(result.get("compact_revision", 0)),
                               canceled=bool(result.get("canceled")),
                               cancel_reason=str(result.get("cancel_reason", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as err:   # bad base64 and JSON are ValueErrors
            raise MemberLost(f"etcd at {self.endpoint}: unreadable watch answer ({err}): {line[:200]!r}") from err
