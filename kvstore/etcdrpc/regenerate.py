"""Write this package's message modules from the protocol descriptors of the installed etcd3 package.

etcd3 0.12 ships message modules made by a 2017 protoc, which protobuf >= 4 refuses to load (and which
kept the plugin on protobuf 3.20's pure-Python decoder: ~30 us per watched key, every change on every
host). The descriptors inside them are fine: this reads each one (the `serialized_pb` literal, by parsing
the source, not importing it) and writes a module in today's protoc form, which every protobuf since 3.20
loads, with its C decoder where it has one.

    .venv/bin/python -m kvstore.etcdrpc.regenerate
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

HERE = Path(__file__).parent
MODULES = ("kv_pb2", "auth_pb2", "rpc_pb2")   # in dependency order

TEMPLATE = '''"""etcd's {name} messages, made by kvstore/etcdrpc/regenerate.py from etcd3 {version}. Do not edit."""
# ruff: noqa
# mypy: ignore-errors
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf.internal import builder as _builder
{imports}
DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile({blob!r})
_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, "etcd3.etcdrpc.{name}", globals())
'''


def serialized(source: str) -> bytes:
    """The serialized_pb=... argument of the file's FileDescriptor call."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            value = node.value
            if isinstance(value, ast.Call):   # _b('...'): latin-1 text of the bytes
                value = value.args[0]
            literal = ast.literal_eval(value)
            return literal.encode("latin1") if isinstance(literal, str) else literal
    raise ValueError("no serialized_pb in the module")


def main() -> None:
    spec = importlib.util.find_spec("etcd3")
    assert spec is not None and spec.origin is not None
    source_dir = Path(spec.origin).parent / "etcdrpc"
    from importlib.metadata import version
    for name in MODULES:
        blob = serialized((source_dir / f"{name}.py").read_text())
        imports = "from kvstore.etcdrpc import kv_pb2, auth_pb2  # dependencies first\n" if name == "rpc_pb2" else ""
        (HERE / f"{name}.py").write_text(TEMPLATE.format(name=name, version=version("etcd3"), imports=imports,
                                                         blob=blob))
        print(f"wrote {HERE / name}.py ({len(blob)} bytes of descriptor)")


if __name__ == "__main__":
    main()
