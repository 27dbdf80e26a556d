"""Every failure a plugin call can report. The HTTP layer turns each into {"Err": message}.

Messages reach `docker` users verbatim: say what is wrong and, where it helps, what to do.
"""

from __future__ import annotations


class PluginError(Exception):
    """A request that cannot be served; the message names what is wrong."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(PluginError):
    """A missing or malformed field, or a value outside what the call accepts."""


class NotFound(PluginError):
    """An unknown network, endpoint or pool."""


class Conflict(PluginError):
    """The request contradicts existing state (address taken, different network settings...)."""


class Unavailable(PluginError):
    """A dependency (etcd, the kernel) cannot serve the request now; retrying later may work."""


class MethodNotFound(PluginError):
    status = 404


def short_id(docker_id: str) -> str:
    """How messages, logs and status name a Docker ID (network, endpoint, container): as `docker` prints it."""
    return docker_id[:12]
