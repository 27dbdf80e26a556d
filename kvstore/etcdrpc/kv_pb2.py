"""etcd's kv_pb2 messages, made by kvstore/etcdrpc/regenerate.py from etcd3 0.12.0. Do not edit."""
# ruff: noqa
# mypy: ignore-errors
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf.internal import builder as _builder

DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(b'\n\x08kv.proto\x12\x06mvccpb"u\n\x08KeyValue\x12\x0b\n\x03key\x18\x01 \x01(\x0c\x12\x17\n\x0fcreate_revision\x18\x02 \x01(\x03\x12\x14\n\x0cmod_revision\x18\x03 \x01(\x03\x12\x0f\n\x07version\x18\x04 \x01(\x03\x12\r\n\x05value\x18\x05 \x01(\x0c\x12\r\n\x05lease\x18\x06 \x01(\x03"\x91\x01\n\x05Event\x12%\n\x04type\x18\x01 \x01(\x0e2\x17.mvccpb.Event.EventType\x12\x1c\n\x02kv\x18\x02 \x01(\x0b2\x10.mvccpb.KeyValue\x12!\n\x07prev_kv\x18\x03 \x01(\x0b2\x10.mvccpb.KeyValue" \n\tEventType\x12\x07\n\x03PUT\x10\x00\x12\n\n\x06DELETE\x10\x01B\x18\n\x14com.coreos.jetcd.apiP\x01b\x06proto3')
_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, "etcd3.etcdrpc.kv_pb2", globals())
