"""The layering rule of docs/architecture.md, as import-linter contracts (pyproject.toml [tool.importlinter]):
no module imports a layer above its own. `make lint` runs the same check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_no_import_runs_back_up_the_layers() -> None:
    done = lint()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_the_check_sees_an_import_that_runs_up(tmp_path: Path) -> None:
    # The kernel layer raises the error vocabulary; a contract forbidding that must be reported broken, which
    # shows the graph the check reads is the real one.
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["plugin"]\n\n'
        '[[tool.importlinter.contracts]]\nname = "probe"\ntype = "forbidden"\n'
        'source_modules = ["plugin.kernel.datapath"]\nforbidden_modules = ["plugin.errors"]\n'
    )
    done = lint("--config", str(config))
    assert done.returncode != 0 and "plugin.kernel.datapath -> plugin.errors" in done.stdout, done.stdout


def test_etcd_messages_are_decoded_by_protobufs_c_core() -> None:
    """etcd3's own message modules would pin protobuf 3.20 (pure Python: ~80 us per key read); the plugin
    gives it regenerated ones (kvstore/etcdrpc), which are what etcd3 uses and which decode in C."""
    from google.protobuf.internal import api_implementation

    import kvstore.client  # noqa: F401 - installs the messages, then imports etcd3
    import kvstore.etcdrpc.rpc_pb2 as ours

    assert sys.modules["etcd3.etcdrpc.rpc_pb2"] is ours
    import etcd3.etcdrpc

    assert etcd3.etcdrpc.RangeRequest is ours.RangeRequest
    assert api_implementation.Type() == "upb"


def test_the_etcd_message_modules_are_what_regenerate_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvstore.etcdrpc import regenerate

    monkeypatch.setattr(regenerate, "HERE", tmp_path)
    regenerate.main()
    for name in regenerate.MODULES:
        committed = (Path(regenerate.__file__).parent / f"{name}.py").read_text()
        assert (tmp_path / f"{name}.py").read_text() == committed, f"{name}.py differs: run the regenerate module"
