"""pyoverlay against an etcd that requires TLS client certificates and user/password authentication.

A real etcd (Debian's etcd-server) is started with its own CA, a server certificate, --client-cert-auth
and auth enabled; pyoverlay's user may only touch its prefix. Both the store layer and a running
`pyoverlay serve` are tested against it, and so are the ways a bad setting fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvstore import EtcdConfig, KVStore, StoreError, StoreUnavailable
from tests.plugin_client import call
from tests.rig import PYOVERLAY, free_port, sh, wait_for

PREFIX = "/pyoverlay-tls"
PASSWORD = "s3cret-pw"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(ca[0].subject if ca else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(ca[1] if ca else key, hashes.SHA256())


class TlsEtcd:
    def __init__(self, workdir: Path, client_cert_auth: bool = True) -> None:
        self.dir = workdir
        self.client_cert_auth = client_cert_auth   # False: TLS and passwords, no client certificates asked
        ca_key = _key()
        ca = _cert("pyoverlay test CA", ca_key, None)
        self.cacert, _ = _write(workdir / "ca", ca_key, ca)
        skey = _key()
        self.server = _write(workdir / "server", skey, _cert("etcd", skey, (ca, ca_key), server=True))
        rkey = _key()
        self.root = _write(workdir / "root", rkey, _cert("root", rkey, (ca, ca_key)))
        ckey = _key()
        self.client = _write(workdir / "pyo", ckey, _cert("pyo", ckey, (ca, ca_key)))
        other_ca_key = _key()
        other_ca = _cert("someone else's CA", other_ca_key, None)
        okey = _key()
        self.stranger = _write(workdir / "stranger", okey, _cert("pyo", okey, (other_ca, other_ca_key)))
        self.port, self.peer = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        purl = f"http://127.0.0.1:{self.peer}"
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["etcd", "--name", "tls", "--data-dir", str(self.dir / "data"), "--listen-client-urls", self.url,
             "--advertise-client-urls", self.url, "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
             "--initial-cluster", f"tls={purl}", "--cert-file", self.server[0], "--key-file", self.server[1],
             *(["--trusted-ca-file", self.cacert, "--client-cert-auth"] if self.client_cert_auth else []),
             "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_for("TLS etcd", lambda: self.ctl("endpoint", "health", check=False).returncode == 0, timeout=20)
        # Auth: root (needed to enable it) and pyoverlay's own user, allowed only under its prefix.
        self.ctl("user", "add", "root", "--new-user-password", "rootpw")
        self.ctl("user", "grant-role", "root", "root")
        self.ctl("role", "add", "pyo")
        self.ctl("role", "grant-permission", "pyo", "--prefix=true", "readwrite", f"{PREFIX}/")
        self.ctl("user", "add", "pyo", "--new-user-password", PASSWORD)
        self.ctl("user", "grant-role", "pyo", "pyo")
        self.ctl("auth", "enable")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        auth = ["--user", "root:rootpw"] if args[:2] != ("endpoint", "health") else []
        if args[:2] in (("user", "add"), ("user", "grant-role"), ("role", "add"), ("role", "grant-permission"),
                        ("auth", "enable")):
            auth = []  # before auth is enabled
        # etcdctl's own default deadline is 5 s; with auth on, every call first checks a bcrypt password, which
        # on a busy 2-core machine can take most of that. Room, not a time the test asserts.
        return sh("etcdctl", f"--endpoints={self.url}", f"--cacert={self.cacert}", f"--cert={self.root[0]}",
                  f"--key={self.root[1]}", "--dial-timeout=20s", "--command-timeout=60s", *auth, *args,
                  check=check, timeout=90)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _tls_etcd(client_cert_auth: bool) -> Iterator[TlsEtcd]:
    workdir = Path(tempfile.mkdtemp(prefix="pyoverlay-tls-"))
    server = TlsEtcd(workdir, client_cert_auth)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[TlsEtcd]:
    yield from _tls_etcd(client_cert_auth=True)


@pytest.fixture(scope="module")
def tls_password_etcd() -> Iterator[TlsEtcd]:
    yield from _tls_etcd(client_cert_auth=False)


def _config(e: TlsEtcd, **over: object) -> EtcdConfig:
    base: dict[str, object] = {"endpoints": [e.url], "cacert": e.cacert, "cert": e.client[0], "key": e.client[1],
                               "username": "pyo", "password": PASSWORD, "timeout": 3.0}
    base.update(over)
    return EtcdConfig(**base)  # type: ignore[arg-type]


def _watch_follows(store: KVStore) -> None:
    """A watch of PREFIX (holding PREFIX/a) sees its snapshot, then a new key."""
    seen: list[str] = []
    watch = store.watch_prefix(f"{PREFIX}/", lambda kvs, rev: seen.extend(kv.key for kv in kvs),
                               lambda evs: seen.extend(ev.key for ev in evs))
    try:
        wait_for("snapshot", lambda: f"{PREFIX}/a" in seen, timeout=10)
        store.put(f"{PREFIX}/c", b"3")
        wait_for("watch event", lambda: f"{PREFIX}/c" in seen, timeout=10)
    finally:
        watch.stop()


def test_store_works_over_tls_with_client_certificate_and_password(tls_etcd: TlsEtcd) -> None:
    store = KVStore(_config(tls_etcd), health_key=f"{PREFIX}/health")
    try:
        assert store.health() > 0
        store.put(f"{PREFIX}/a", b"1")
        assert store.get(f"{PREFIX}/a").value == b"1"  # type: ignore[union-attr]
        assert store.create(f"{PREFIX}/b", b"2") and not store.create(f"{PREFIX}/b", b"3")
        lease = store.grant(10)
        store.put(f"{PREFIX}/leased", b"x", lease=lease)
        assert store.refresh(lease) > 0
        _watch_follows(store)
        # The role allows this prefix only.
        with pytest.raises(StoreError, match="permission denied"):
            store.put("/elsewhere", b"x")
        # etcd's JSON gateway refuses requests whose client certificate names a user: watches stay on gRPC.
        assert store.gateway is False
    finally:
        store.close()


def test_watches_go_through_the_json_gateway_with_tls_and_a_password(tls_password_etcd: TlsEtcd) -> None:
    """TLS without client certificates, and a password: the watch reads etcd's JSON gateway over TLS with the
    token in its Authorization header."""
    e = tls_password_etcd
    store = KVStore(EtcdConfig([e.url], cacert=e.cacert, username="pyo", password=PASSWORD, timeout=3.0))
    try:
        store.put(f"{PREFIX}/a", b"1")
        _watch_follows(store)
        assert store.gateway is True
    finally:
        store.close()


@pytest.mark.parametrize("over, needle", [
    ({"password": "wrong"}, "authentication failed"),
    ({"cert": None, "key": None}, "check etcd_cacert, etcd_cert and etcd_key"),
    ({"cacert": None}, "etcd_cacert is not set"),
])
def test_bad_credentials_fail_clearly_and_fast(tls_etcd: TlsEtcd, over: dict[str, object], needle: str) -> None:
    if "cacert" in over:
        over = {**over, "endpoints": [tls_etcd.url]}
    store = KVStore(_config(tls_etcd, **over))
    try:
        began = time.monotonic()
        with pytest.raises(StoreError) as err:
            store.put(f"{PREFIX}/nope", b"x")
        print(f"{over}: {err.value} (after {time.monotonic() - began:.1f}s)")
        assert needle in str(err.value).lower()
        assert tls_etcd.ctl("get", f"{PREFIX}/nope").stdout == ""
    finally:
        store.close()


def test_a_certificate_from_another_ca_is_refused(tls_etcd: TlsEtcd) -> None:
    store = KVStore(_config(tls_etcd, cert=tls_etcd.stranger[0], key=tls_etcd.stranger[1]))
    try:
        with pytest.raises(StoreUnavailable):
            store.put(f"{PREFIX}/nope", b"x")
    finally:
        store.close()


def test_plugin_serves_against_tls_etcd(tls_etcd: TlsEtcd) -> None:
    """`pyoverlay serve` with ETCD_CACERT/CERT/KEY and ETCD_USERNAME/PASSWORD: IPAM calls land in etcd."""
    work = Path(tempfile.mkdtemp(prefix="pyoverlay-tls-plugin-"))
    sock = work / "pyoverlay.sock"
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYOVERLAY_SOCKET": str(sock),
           "PYOVERLAY_STATE_DIR": str(work / "state"), "PYOVERLAY_HOST": "tls-host", "PYOVERLAY_VTEP": "127.0.0.1",
           "ETCD_ENDPOINTS": tls_etcd.url, "ETCD_CACERT": tls_etcd.cacert, "ETCD_CERT": tls_etcd.client[0],
           "ETCD_KEY": tls_etcd.client[1], "ETCD_USERNAME": "pyo", "ETCD_PASSWORD": PASSWORD,
           "PYOVERLAY_ETCD_PREFIX": f"{PREFIX}/v1", "PYOVERLAY_DNS": "false", "PYOVERLAY_PROPAGATE": "false",
           "PYOVERLAY_VTEP_FILTER": "false", "PYOVERLAY_METRICS_ADDR": "off",
           "DOCKER_HOST": f"unix://{work}/no-docker.sock"}
    proc = subprocess.Popen([PYOVERLAY, "serve"], env=env, stdout=open(work / "plugin.log", "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("socket", sock.exists, timeout=10)
        answers: list[tuple[int, dict[str, Any]]] = []

        def pool_requested() -> bool:
            # On a busy machine the first calls may find the TLS + password handshake slower than the plugin's
            # etcd deadline: they must then fail clearly ("cluster store unavailable"), and a retry succeed.
            answers.append(call(sock, "IpamDriver.RequestPool", {"AddressSpace": "LocalDefault",
                                                                 "Pool": "10.97.0.0/24", "Options": {}}))
            status, body = answers[-1]
            assert status == 200 or "cluster store unavailable" in body.get("Err", ""), body
            return status == 200

        wait_for("RequestPool through TLS etcd", pool_requested, timeout=60)
        got = answers[-1][1]
        status, addr = call(sock, "IpamDriver.RequestAddress", {"PoolID": got["PoolID"], "Address": ""})
        assert status == 200 and addr["Address"].startswith("10.97.0."), addr
        keys = tls_etcd.ctl("get", f"{PREFIX}/v1/", "--prefix", "--keys-only").stdout.split()
        assert f"{PREFIX}/v1/pools/cidr.10.97.0.0_24" in keys
        assert f"{PREFIX}/v1/addrs/cidr.10.97.0.0_24/{addr['Address'].split('/')[0]}" in keys
        wait_for("host registered", lambda: f"{PREFIX}/v1/hosts/tls-host" in tls_etcd.ctl(
            "get", f"{PREFIX}/v1/hosts/", "--prefix", "--keys-only").stdout, timeout=15)
        res = sh("env", "-i", *(f"{k}={v}" for k, v in env.items()), PYOVERLAY, "status", "--json", check=False)
        assert '"healthy": true' in res.stdout, res.stdout + res.stderr
        for method, body in (("IpamDriver.ReleaseAddress", {"PoolID": got["PoolID"], "Address": addr["Address"]}),
                             ("IpamDriver.ReleasePool", {"PoolID": got["PoolID"]})):
            assert call(sock, method, body)[0] == 200
        assert "10.97.0.0_24" not in tls_etcd.ctl("get", f"{PREFIX}/v1/", "--prefix", "--keys-only").stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
