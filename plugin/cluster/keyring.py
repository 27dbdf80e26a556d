"""Key material for encrypted networks: per-host X25519 key pairs and the ESP keys derived from them.

Each host has its own X25519 key pair per epoch. The private key never leaves the host (a 0600 file under
the state directory); the public key and its epoch are published in the host's etcd record. The key of
each direction between two hosts is HKDF-SHA256 over their X25519 shared secret, bound to both epochs and
both VTEP addresses, so reading etcd reveals no key, and every direction and epoch pair has its own key
and SPI. With a cluster secret, the published key set is authenticated with HMAC-SHA256 so someone who can
write etcd cannot substitute a public key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from plugin.kernel.ipsec import SAKey

log = logging.getLogger(__name__)

KEEP_EPOCHS = 2        # the current key pair and the one before it (in-flight packets, slow peers)
GCM_SALT = 4           # rfc4106: 4 bytes of salt follow the AES key
SPI_MIN = 0x1000       # below this SPIs are reserved or conventional
NONCE = re.compile(r"^[0-9a-f]{32}$")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive(shared: bytes, src: str, dst: str, src_epoch: int, dst_epoch: int, key_bits: int,
           nonce: str = "") -> SAKey:
    """The ESP key and SPI of one direction (src -> dst) for one pair of epochs, under the receiver's nonce
    for that sender (a fresh one whenever the receiver creates its inbound side from scratch, so an SA
    removed and made again never comes back the same, with a fresh replay window)."""
    info = f"pyoverlay esp v2|{src}>{dst}|{src_epoch}>{dst_epoch}|aes{key_bits}|{nonce}".encode()
    out = HKDF(algorithm=hashes.SHA256(), length=key_bits // 8 + GCM_SALT + 4, salt=b"pyoverlay/v1",
               info=info).derive(shared)
    spi = int.from_bytes(out[:4], "big")
    spi = SPI_MIN + spi % (0xFFFFFFFF - SPI_MIN)
    return SAKey(spi, out[4:], src, dst, src_epoch, dst_epoch)


def mac_of(secret: str, host: str, vtep: str, keys: dict[int, str]) -> str:
    """HMAC over everything that must not be substituted in a host's published key set."""
    body = "|".join([host, vtep, *(f"{e}={keys[e]}" for e in sorted(keys))])
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()


def verify(secret: str | None, host: str, vtep: str, keys: dict[int, str], mac: str | None) -> str | None:
    """None when acceptable; otherwise why the published keys are refused."""
    if secret is None:
        return None
    if not mac:
        return "its public keys carry no authentication code, and PYOVERLAY_CLUSTER_SECRET is set"
    if not hmac.compare_digest(mac, mac_of(secret, host, vtep, keys)):
        return "its public keys fail authentication (substituted, or a different PYOVERLAY_CLUSTER_SECRET)"
    return None


class KeyRing:
    """This host's key pairs, newest last, persisted as <dir>/x25519-<epoch>.key (0600, raw private)."""

    FILE = re.compile(r"x25519-(\d+)\.key$")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pairs: dict[int, X25519PrivateKey] = {}
        self._load()
        self.nonces: dict[str, str] = self._load_nonces()   # peer -> nonce of the SAs from it to us

    def _load(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        for path in self.directory.iterdir():
            m = self.FILE.match(path.name)
            if m:
                try:
                    self.pairs[int(m.group(1))] = X25519PrivateKey.from_private_bytes(path.read_bytes())
                except ValueError as err:
                    log.error("ignoring unreadable key file %s: %s", path, err)
        if not self.pairs:
            self.rotate()
        self._prune()

    @property
    def epoch(self) -> int:
        return max(self.pairs)

    def rotate(self) -> int:
        """A new key pair (epoch + 1) becomes current; the oldest beyond KEEP_EPOCHS is forgotten."""
        epoch = (max(self.pairs) + 1) if self.pairs else 1
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        path = self.directory / f"x25519-{epoch}.key"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.pairs[epoch] = key
        self._prune()
        return epoch

    def _prune(self) -> None:
        for epoch in sorted(self.pairs)[:-KEEP_EPOCHS]:
            del self.pairs[epoch]
            (self.directory / f"x25519-{epoch}.key").unlink(missing_ok=True)

    def created(self) -> float:
        """When the current key pair was made (its file's mtime)."""
        try:
            return (self.directory / f"x25519-{self.epoch}.key").stat().st_mtime
        except OSError:
            return time.time()

    def public(self) -> dict[int, str]:
        """epoch -> base64 public key, for the host record."""
        return {e: _b64(public_bytes(k.public_key())) for e, k in sorted(self.pairs.items())}

    def _load_nonces(self) -> dict[str, str]:
        try:
            raw = json.loads((self.directory / "nonces.json").read_text())
            return {str(k): str(v) for k, v in raw.items() if NONCE.match(str(v))}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_nonces(self) -> None:
        path = self.directory / "nonces.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.nonces, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def new_nonce(self, peer: str) -> str:
        self.nonces[peer] = secrets.token_hex(16)
        self._save_nonces()
        return self.nonces[peer]

    def forget_nonces(self, keep: set[str]) -> None:
        if set(self.nonces) - keep:
            self.nonces = {p: n for p, n in self.nonces.items() if p in keep}
            self._save_nonces()

    def shared(self, epoch: int, peer_public_b64: str) -> bytes:
        peer = X25519PublicKey.from_public_bytes(base64.b64decode(peer_public_b64))
        return self.pairs[epoch].exchange(peer)
