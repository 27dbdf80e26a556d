"""A small authoritative DNS server standing in for "the internet" in tests: no name outside this machine
may be resolved for real here. `python -m tests.dns_upstream ADDRESS NAME=IP ...` answers those names
(A records) and NXDOMAIN for anything else, on UDP and TCP port 53 of ADDRESS."""

from __future__ import annotations

import socket
import socketserver
import struct
import sys
import threading

import dns.message
import dns.rcode
import dns.rrset

RECORDS: dict[str, str] = {}


def reply(data: bytes) -> bytes:
    query = dns.message.from_wire(data)
    resp = dns.message.make_response(query)
    q = query.question[0]
    ip = RECORDS.get(q.name.to_text(omit_final_dot=True).lower())
    if ip is None:
        resp.set_rcode(dns.rcode.NXDOMAIN)
    elif q.rdtype == 1:
        resp.answer.append(dns.rrset.from_text(q.name, 30, "IN", "A", ip))
    return resp.to_wire()


class UDP(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(reply(data), self.client_address)


class TCP(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        n = struct.unpack("!H", self.rfile.read(2))[0]
        out = reply(self.rfile.read(n))
        self.wfile.write(struct.pack("!H", len(out)) + out)


def main() -> None:
    address = sys.argv[1]
    for item in sys.argv[2:]:
        name, ip = item.split("=")
        RECORDS[name.lower()] = ip
    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer((address, 53), UDP)
    tcp = socketserver.ThreadingTCPServer((address, 53), TCP)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print("ready", flush=True)
    udp.serve_forever()


if __name__ == "__main__":
    socket.setdefaulttimeout(5)
    main()
