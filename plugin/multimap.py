"""A dict of small collections kept without empty ones: the reverse indexes (host -> endpoint keys,
endpoint ID -> keys) that let a change touch only what it concerns.

Most groups hold one value (an endpoint ID has one key): a group is a tuple while it is small (a 1-tuple
takes 48 bytes, a set 216) and becomes a set when it grows past SMALL. Read a group by iterating it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Hashable)

SMALL = 8

MultiMap = dict[K, tuple[V, ...] | set[V]]


def link(index: MultiMap[K, V], key: K, value: V) -> None:
    values = index.get(key)
    if values is None:
        index[key] = (value,)
    elif isinstance(values, set):
        values.add(value)
    elif value not in values:
        index[key] = (*values, value) if len(values) < SMALL else {*values, value}


def unlink(index: MultiMap[K, V], key: K, value: V) -> None:
    values = index.get(key)
    if values is None:
        return
    if isinstance(values, set):
        values.discard(value)
    else:
        values = index[key] = tuple(v for v in values if v != value)
    if not values:
        del index[key]
