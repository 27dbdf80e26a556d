"""Boots the user-mode-linux guest once and runs tests/guest/ (encrypted networks) inside it.

The host kernel has no ESP; the guest's has. The guest runs the same rig (dockerd hosts, etcd, pyoverlay)
and pytest; its exit status and output come back here. Also: `make test-ipsec`.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import uml

pytestmark = [pytest.mark.docker, pytest.mark.ipsec]


# The whole guest suite is this one test: it gets the guest's own bound, not the suite's per-test one.
@pytest.mark.timeout(3700)
def test_encrypted_networks_in_an_esp_capable_guest() -> None:
    problem = uml.available()
    assert problem is None, problem
    args = os.environ.get("PYOVERLAY_GUEST_PYTEST_ARGS", "-v -s -p no:cacheprovider --timeout=2400")
    # The guest's hosts run Debian 12's Docker 20.10 (docs/compatibility.md): the encrypted data path is the
    # kernel's, the same whichever engine asks for it, and one guest run is ten minutes of the suite.
    rc, output = uml.run([sys.executable, "-m", "pytest", *args.split(), "tests/guest"], timeout=3600,
                         stream=False, env={"PYOVERLAY_ENGINE": "20.10"})
    print(output)
    assert rc == 0, f"the encrypted-network tests failed inside the guest (exit status {rc}); output above"
