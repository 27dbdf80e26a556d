"""Talk to a plugin socket the way Docker does (POST, no Content-Type, JSON body)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plugin.ops.commands import UnixHTTP


def call(sock: Path | str, method: str, body: Any = None, raw: bytes | None = None,
         timeout: float = 30) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTP(str(sock), timeout)
    try:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        conn.request("POST", f"/{method}", body=data,
                     headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else {}
    finally:
        conn.close()
