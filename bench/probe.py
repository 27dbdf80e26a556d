"""ICMP echo every 10 ms until the target answers; prints the CLOCK_MONOTONIC time of the first reply.

Run inside a container's network namespace (nsenter -n); prints "ready" once its socket is open, then
either the time of the first reply or "timeout". With `go` as third argument it waits for a line on stdin
before the first echo (a prober that starts the moment `docker run` returns, with no start-up cost).
Standard library only.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def main() -> int:
    target, limit = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    ident = os.getpid() & 0xFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    print("ready", flush=True)
    if sys.argv[3:4] == ["go"]:
        sys.stdin.readline()
    deadline = time.monotonic() + limit
    seq = 0
    while time.monotonic() < deadline:
        seq = (seq + 1) & 0xFFFF
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        payload = b"pyoverlay-probe"
        packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload
        try:
            sock.sendto(packet, (target, 0))
        except OSError:
            pass  # no route / neighbour yet
        tick = time.monotonic() + 0.010
        while (left := tick - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, (src, _) = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src == target and kind == 0 and rid == ident:
                print(f"{time.monotonic():.6f}", flush=True)
                return 0
    print("timeout", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
