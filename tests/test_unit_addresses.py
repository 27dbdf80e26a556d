"""The records' fast address validators (socket's C parser first) give exactly what ipaddress gives, and
refuse what it refuses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.records import _interface, _ip


def _reference(fn, value: str) -> str | None:  # type: ignore[no-untyped-def]
    try:
        return str(fn(value))
    except ValueError:
        return None


def _ours(fn, value: str) -> str | None:  # type: ignore[no-untyped-def]
    try:
        return fn(value)
    except ValueError:
        return None


@settings(max_examples=1000, deadline=None)   # a wall clock is no test here
@given(st.ip_addresses())
def test_every_address_canonical_as_ipaddress_has_it(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    for text in {str(addr), addr.exploded, str(addr).upper()}:
        assert _ours(_ip, text) == _reference(ipaddress.ip_address, text)


@settings(max_examples=1000, deadline=None)   # a wall clock is no test here
@given(st.ip_addresses(), st.integers(0, 128))
def test_every_interface_canonical_as_ipaddress_has_it(addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                       prefix: int) -> None:
    for text in (f"{addr}/{prefix}", f"{addr.exploded}/{prefix}", f"{addr}/0{prefix}"):
        assert _ours(_interface, text) == _reference(ipaddress.ip_interface, text)


@pytest.mark.parametrize("text", [
    "", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.256", " 1.2.3.4", "1.2.3.4 ", "1.2.3.4\n", "::ffff:1.2.3.4",
    "::ffff:0102:0304", "fe80::1%eth0", "1:2:3:4:5:6:7:8:9", "::1::", "１.2.3.4", "0x1.2.3.4", "1.2.3.4/",
    "1.2.3.4/33", "1.2.3.4/+8", "1.2.3.4/255.255.0.0", "::1/129", "::1/-1", "1.2.3.4/８", "10.0.0.1/ 8",
])
def test_odd_spellings_answered_as_ipaddress_answers(text: str) -> None:
    assert _ours(_ip, text) == _reference(ipaddress.ip_address, text)
    assert _ours(_interface, text) == _reference(ipaddress.ip_interface, text)
