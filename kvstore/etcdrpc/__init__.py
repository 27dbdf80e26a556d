"""etcd's gRPC messages for the etcd3 client, in the form today's protobuf loads (see regenerate.py).

Importing this package puts them where etcd3 looks for its own (`etcd3.etcdrpc.*_pb2`); it must come before
etcd3's first import (kvstore/client.py does both). etcd3's stubs and request builders then use them, and
protobuf decodes with its C core (upb) instead of pure Python: a watch answer or a page of a range read
costs microseconds per key instead of tens.
"""

from __future__ import annotations

import sys

from kvstore.etcdrpc import auth_pb2, kv_pb2, rpc_pb2

for _name, _module in (("kv_pb2", kv_pb2), ("auth_pb2", auth_pb2), ("rpc_pb2", rpc_pb2)):
    _known = sys.modules.setdefault(f"etcd3.etcdrpc.{_name}", _module)
    if _known is not _module:
        raise ImportError("etcd3 was imported before kvstore.etcdrpc: its own message modules are loaded")
