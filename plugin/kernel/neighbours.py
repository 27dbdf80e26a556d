"""Remote endpoints into a VXLAN device in bulk: neighbour and FDB messages, many per netlink write.

A remote endpoint needs three kernel entries (the VXLAN FDB entry to its VTEP, the bridge's static entry,
the permanent neighbour). Through pyroute2's request API that is three request/acknowledge round trips
with a full message encoder each: 1.26 ms per endpoint here, 25 s for 20,000. This module packs the same
messages (their layout is fixed by linux/neighbour.h and linux/netlink.h) with `struct` and writes up to
64 KiB of them at a time on one rtnetlink socket in the network's namespace: 20 us per endpoint. The kernel
processes a write's messages in order within the write; only failures are answered (no NLM_F_ACK), except
for the last message of each write, whose acknowledgement says that every error of that write has been
read. pyroute2 stays for everything else (links, addresses, routes, dumps).

Values arrive as text from validated records and are turned into bytes by `ipaddress` and `bytes.fromhex`
here: a bad one fails its own entry (ValueError), never the batch, and nothing is ever parsed as text by
anything else.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterator

Peer = tuple[str, str, str]   # (ip, mac, vtep)

AF_BRIDGE = 7
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NDA_DST, NDA_LLADDR = 1, 2
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80   # NUD_NOARP: a static bridge FDB entry (PERMANENT = local there)
NTF_SELF, NTF_MASTER = 0x02, 0x04
WRITE_MAX = 64 * 1024          # bytes of messages per write (the errors they can cause fit the socket buffer)
RCVBUF = 1 << 20
ACK_TIMEOUT = 10.0
GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EINVAL)   # removing what is not there: fine

_HEADER = struct.Struct("=IHHII")      # nlmsghdr: len, type, flags, seq, pid
_NDMSG = struct.Struct("=B3xiHBB")     # ndmsg: family, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")           # rtattr: len, type


def _attr(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _message(kind: int, flags: int, seq: int, family: int, ifindex: int, state: int, ntf: int,
             attrs: list[tuple[int, bytes]]) -> bytes:
    body = _NDMSG.pack(family, ifindex, state, ntf, 0) + b"".join(_attr(k, v) for k, v in attrs)
    return _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def _mac(text: str) -> bytes:
    if not _MAC.fullmatch(text):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes.fromhex(text.replace(":", ""))


def _family(packed: bytes) -> int:
    return socket.AF_INET if len(packed) == 4 else socket.AF_INET6


def messages(ifindex: int, peer: Peer, add: bool) -> list[tuple[int, int, int, int, int, list[tuple[int, bytes]]]]:
    """The three entries of one remote endpoint as (type, flags, family, state, ntf flags, attributes);
    ValueError for a malformed address."""
    ip, mac, vtep = ipaddress.ip_address(peer[0]).packed, _mac(peer[1]), ipaddress.ip_address(peer[2]).packed
    if add:
        new = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
        # The bridge's own entry too (as Docker's overlay does): with learning off on the VXLAN port the
        # bridge would otherwise flood every frame for a remote container to every local one.
        return [(RTM_NEWNEIGH, new, AF_BRIDGE, NUD_PERMANENT, NTF_SELF, [(NDA_LLADDR, mac), (NDA_DST, vtep)]),
                (RTM_NEWNEIGH, new, AF_BRIDGE, NUD_NOARP, NTF_MASTER, [(NDA_LLADDR, mac)]),
                (RTM_NEWNEIGH, new, _family(ip), NUD_PERMANENT, 0, [(NDA_DST, ip), (NDA_LLADDR, mac)])]
    return [(RTM_DELNEIGH, NLM_F_REQUEST, _family(ip), 0, 0, [(NDA_DST, ip), (NDA_LLADDR, mac)]),
            (RTM_DELNEIGH, NLM_F_REQUEST, AF_BRIDGE, 0, NTF_SELF, [(NDA_LLADDR, mac), (NDA_DST, vtep)]),
            (RTM_DELNEIGH, NLM_F_REQUEST, AF_BRIDGE, 0, NTF_MASTER, [(NDA_LLADDR, mac)])]


def _errors(data: bytes) -> Iterator[tuple[int, int]]:
    """(sequence number, errno) of each error or acknowledgement (errno 0) in a read."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return
        if kind == NLMSG_ERROR and offset + _HEADER.size + 4 <= len(data):
            code = struct.unpack_from("=i", data, offset + _HEADER.size)[0]
            # The error's copy of the request says which one it was; its header carries our sequence number.
            if offset + _HEADER.size + 4 + _HEADER.size <= len(data):
                seq = _HEADER.unpack_from(data, offset + _HEADER.size + 4)[3]
            yield seq, -code
        offset += (length + 3) & ~3


def open_socket() -> socket.socket:
    """An rtnetlink socket in the calling thread's namespace (the caller enters the network's first)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((0, 0))
    sock.settimeout(ACK_TIMEOUT)
    return sock


def program(sock: socket.socket, ifindex: int, add: list[Peer], remove: list[Peer]) -> list[tuple[Peer, Exception]]:
    """Remove, then add, these peers on the device; returns the peers whose entries failed."""
    failed: dict[Peer, Exception] = {}
    owner: dict[int, tuple[Peer, bool]] = {}
    batch: list[tuple[int, int, int, int, int, list[tuple[int, bytes]]]] = []
    for peers, adding in ((remove, False), (add, True)):
        for peer in peers:
            try:
                msgs = messages(ifindex, peer, adding)
            except ValueError as err:
                failed[peer] = err
                continue
            for m in msgs:
                owner[len(batch) + 1] = (peer, adding)
                batch.append(m)
    encoded = [_message(kind, flags, seq, family, ifindex, state, ntf, attrs)
               for seq, (kind, flags, family, state, ntf, attrs) in enumerate(batch, start=1)]
    first = 0
    while first < len(encoded):
        last, size = first, len(encoded[first])
        while last + 1 < len(encoded) and size + len(encoded[last + 1]) <= WRITE_MAX:
            last += 1
            size += len(encoded[last])
        # The write's last message asks for an acknowledgement: reading up to it reads every error before it.
        _write(sock, [*encoded[first:last], _with_ack(encoded[last])], last + 1, owner, failed)
        first = last + 1
    return list(failed.items())


def _with_ack(msg: bytes) -> bytes:
    length, kind, flags, seq, pid = _HEADER.unpack_from(msg)
    return _HEADER.pack(length, kind, flags | NLM_F_ACK, seq, pid) + msg[_HEADER.size:]


def _write(sock: socket.socket, chunk: list[bytes], ack_seq: int, owner: dict[int, tuple[Peer, bool]],
           failed: dict[Peer, Exception]) -> None:
    sock.send(b"".join(chunk))
    while True:
        for seq, code in _errors(sock.recv(RCVBUF)):
            if code and seq in owner:
                peer, adding = owner[seq]
                if adding or code not in GONE:
                    failed.setdefault(peer, OSError(code, os.strerror(code)))
            if seq == ack_seq:
                return


RTM_GETNEIGH, NLMSG_DONE, NLM_F_DUMP = 30, 3, 0x300


Neighbour = tuple[int, int, int, bytes | None, bytes | None]   # family, state, flags, NDA_DST, NDA_LLADDR


def _dump(sock: socket.socket, family: int, ifindex: int) -> Iterator[Neighbour]:
    """Every neighbour (family AF_UNSPEC: IPv4 and IPv6) or FDB entry (AF_BRIDGE) of one device.

    Tens of thousands per read (at restart, and in the periodic kernel check): entries of other devices are
    skipped before their attributes are looked at, only the two attributes used are taken, and a whole
    receive buffer is parsed at a time."""
    sock.send(_message(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, family, 0, 0, 0, []))
    header, ndmsg, attr = _HEADER.unpack_from, _NDMSG.unpack_from, _ATTR.unpack_from
    at_ndmsg, at_attrs = _HEADER.size, _HEADER.size + _NDMSG.size
    while True:
        data = sock.recv(RCVBUF)
        offset, size = 0, len(data)
        found: list[Neighbour] = []
        while offset + at_ndmsg <= size:
            length, kind, _, _, _ = header(data, offset)
            if length < at_ndmsg or kind == NLMSG_DONE:
                yield from found
                return
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, offset + at_ndmsg)[0]
                raise OSError(code, os.strerror(code))
            if kind == RTM_NEWNEIGH:
                fam, index, state, ntf, _ = ndmsg(data, offset + at_ndmsg)
                if index == ifindex:
                    dst = mac = None
                    a, stop = offset + at_attrs, offset + length
                    while a + 4 <= stop:
                        alen, atype = attr(data, a)
                        if alen < 4:
                            break
                        if atype == NDA_DST:
                            dst = data[a + 4:a + alen]
                        elif atype == NDA_LLADDR:
                            mac = data[a + 4:a + alen]
                        a += (alen + 3) & ~3
                    found.append((fam, state, ntf, dst, mac))
            offset += (length + 3) & ~3
        yield from found


def entries(sock: socket.socket, ifindex: int) -> list[Peer]:
    """The peers fully programmed on the device: permanent neighbour, VXLAN FDB entry to a VTEP and the
    bridge's static entry (what `program` makes). Read with two dumps, parsed here: pyroute2 takes seconds
    for the tens of thousands of entries of a large fleet, and the reconciler reads them at every pass."""
    vteps: dict[bytes, str] = {}
    bridged: set[bytes] = set()
    for _, state, ntf, dst, mac in _dump(sock, AF_BRIDGE, ifindex):
        if mac is None:
            continue
        if dst and state & NUD_PERMANENT:
            vteps[mac] = socket.inet_ntop(_family(dst), dst)
        elif not ntf & NTF_SELF and state & NUD_NOARP:
            bridged.add(mac)
    ntop = socket.inet_ntop
    return [(ntop(fam, dst), mac.hex(":"), vteps[mac])
            for fam, state, _, dst, mac in _dump(sock, socket.AF_UNSPEC, ifindex)
            if state & NUD_PERMANENT and dst and mac is not None and mac in vteps and mac in bridged]
