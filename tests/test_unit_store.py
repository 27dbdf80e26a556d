"""The etcd client's failover, without etcd: what a call does when the channel under it goes away."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore import EtcdConfig, KVStore
from kvstore.base import StoreUnavailable


def _store(monkeypatch: pytest.MonkeyPatch, clients: list[Any]) -> KVStore:
    store = KVStore(EtcdConfig(endpoints=["http://127.0.0.1:1", "http://127.0.0.1:2"]))
    handed = iter(clients)
    monkeypatch.setattr(store, "_current", lambda: next(handed))
    monkeypatch.setattr(store, "_drop", lambda client: None)
    return store


def test_a_call_on_a_channel_closed_by_another_thread_moves_to_the_current_member(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen in CI: one thread's call failed over and closed the channel while another thread was about to
    call on it; grpc raised ValueError, which reached Docker as an internal error instead of a retry."""
    store = _store(monkeypatch, ["closed", "fresh"])

    def call(client: str) -> str:
        if client == "closed":
            raise ValueError("Cannot invoke RPC on closed channel!")
        return "answer"

    assert store._call("get", call) == "answer"


def test_other_value_errors_are_not_taken_for_a_closed_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, ["a", "b", "c"])

    def call(client: str) -> str:
        raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        store._call("get", call)


def test_a_channel_closed_on_every_try_ends_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, ["x"] * 5)

    def call(client: str) -> str:
        raise ValueError("Cannot invoke RPC on closed channel!")

    with pytest.raises(StoreUnavailable, match="closed channel"):
        store._call("get", call)
