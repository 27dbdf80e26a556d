"""The etcd client's failover, without etcd: what a call does when the channel under it goes away."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore import EtcdConfig, KVStore
from kvstore.base import StoreUnavailable


def _store(monkeypatch: pytest.MonkeyPatch, clients: list[Any]) -> KVStore:
    """A store whose members are the given names; a name starting with "dropped" stands for a client whose
    channel another thread closed (failed over) while the call was starting on it."""
    store = KVStore(EtcdConfig(endpoints=["http://127.0.0.1:1", "http://127.0.0.1:2"]))
    handed = iter(clients)

    def current() -> Any:
        client = next(handed)
        store._client = None if client.startswith("dropped") else client
        return client

    monkeypatch.setattr(store, "_current", current)
    monkeypatch.setattr(store, "_drop", lambda client: None)
    return store


def test_a_call_on_a_channel_closed_by_another_thread_moves_to_the_current_member(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in CI while the leader was killed: one thread's call failed over and closed the channel as
    another thread started a call on it; grpc raised ValueError, which reached Docker as an internal error
    instead of a retry on the next member."""
    store = _store(monkeypatch, ["dropped", "fresh"])

    def call(client: str) -> str:
        if client == "dropped":
            raise ValueError("Cannot invoke RPC on closed channel!")
        return "answer"

    assert store._call("get", call) == "answer"


def test_an_error_on_the_current_channel_is_not_taken_for_a_failover(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, ["a", "b", "c"])

    def call(client: str) -> str:
        raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        store._call("get", call)


def test_a_channel_closed_on_every_try_ends_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, ["dropped"] * 5)

    def call(client: str) -> str:
        raise ValueError("Cannot invoke RPC on closed channel!")

    with pytest.raises(StoreUnavailable, match="closed channel"):
        store._call("get", call)
