"""Peer programming on the in-memory store (no root, no etcd, no kernel): a fleet's endpoints are programmed
exactly, churn leaves exactly what etcd holds, and a departed host's entries go with its records."""

from __future__ import annotations

from tests.peer_fleet import VNI, Fleet


def test_a_fleet_and_its_churn_end_exactly_as_etcd_says() -> None:
    fleet = Fleet(hosts=30, per_host=40)
    fleet.write_hosts()
    fleet.peers.start()
    try:
        keys = fleet.write_endpoints()
        fleet.wait_programmed()
        assert fleet.kernel.count() == 1200
        keys = fleet.churn(keys, 400)
        fleet.wait_programmed()
        assert fleet.kernel.count() == 1200
        # A host's records deleted (as after its grace): its entries go, nobody else's.
        fleet.store.delete(fleet.keys.host("r0"))
        fleet.delete([k for k in keys if fleet.want[k][2] == fleet.vtep(0)])
        fleet.wait_programmed()
        assert all(vtep != fleet.vtep(0) for _, _, vtep in fleet.kernel.peer_entries(VNI))
        print(f"passes: {fleet.peers.passes}, kernel batches: {fleet.kernel.batches}")
    finally:
        fleet.peers.stop()
