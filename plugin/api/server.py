"""`pyoverlay serve`: gunicorn on the plugin's Unix socket, plus the embedded etcd when none is configured.

gunicorn's master binds the socket before anything slow happens, so Docker can connect within a second of
start; one worker process with threads serves every call (all state lives in etcd, the state file and
the kernel, never only in a worker's memory).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from kvstore.embedded import EmbeddedEtcd
from plugin import heap
from plugin.config import Settings
from plugin.kernel import netns

log = logging.getLogger(__name__)


class GunicornLog(Logger):  # type: ignore[misc]
    """gunicorn's own lines go through the plugin's logging (INFO to stdout, warnings and errors to stderr)
    instead of a stderr handler of their own."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.error_log.handlers[:] = []
        self.error_log.propagate = True


class PluginServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        self.cfg.set("bind", [f"unix:{s.socket}"])
        self.cfg.set("workers", 1)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("threads", s.threads)
        self.cfg.set("timeout", 120)
        self.cfg.set("graceful_timeout", 5)
        self.cfg.set("keepalive", 30)
        self.cfg.set("loglevel", s.log_level.lower())
        self.cfg.set("errorlog", "-")
        self.cfg.set("logger_class", GunicornLog)
        self.cfg.set("accesslog", None)
        self.cfg.set("proc_name", "pyoverlay")
        self.cfg.set("control_socket_disable", True)  # one per user by default: instances would collide
        # The socket is created 0660 (never a moment world-writable), then given to the docker group.
        self.cfg.set("umask", 0o117)
        self.cfg.set("when_ready", lambda arbiter: restrict_socket(s.socket))
        self.cfg.set("limit_request_line", 4094)
        self.cfg.set("limit_request_fields", 50)
        self.cfg.set("post_worker_init", self._post_worker_init)
        self.cfg.set("worker_exit", self._worker_exit)

    def _post_worker_init(self, worker: Any) -> None:
        if self.runtime is not None:
            self.runtime.start()

    def _worker_exit(self, server: Any, worker: Any) -> None:
        if self.runtime is not None:
            self.runtime.stop()

    def load(self) -> Any:
        # Runs in the worker, after fork: gRPC channels and netlink sockets must be made here.
        from plugin.api.app import create_app
        from plugin.runtime.runtime import Runtime

        self.runtime = Runtime(self.settings)
        return create_app(self.runtime)


def restrict_socket(path: os.PathLike[str] | str) -> None:
    """root and the docker group (who may run containers, and so may create networks) only."""
    try:
        gid = grp.getgrnam("docker").gr_gid
    except KeyError:
        gid = 0
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)


def private_dir(path: Path) -> None:
    """A directory of pyoverlay's that only root may enter (state, keys, the embedded etcd's socket)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def unreadable_state(path: Path) -> str:
    """Why the state file cannot be used ("" when it can, or is absent). JSON only: this runs before the
    socket is bound, so nothing slow to import (pydantic) may run here."""
    try:
        if isinstance(json.loads(path.read_bytes()), dict):
            return ""
        problem = "not a JSON object"
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as err:
        problem = str(err).splitlines()[0][:200]
    return (f"{path} cannot be read ({problem}). pyoverlay will not start on it: starting from an empty state "
            f"would remove this host's networks from the kernel. Restore the file, or move it away to start afresh")


def _clear_stale_socket(path: os.PathLike[str] | str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def serve(settings: Settings) -> int:
    heap.few_arenas()
    private_dir(settings.state_dir)
    settings.socket.parent.mkdir(parents=True, exist_ok=True)
    problem = unreadable_state(settings.state_dir / "state.json")
    if problem:  # stop here, before anything changes (the worker checks the file fully: LocalState)
        log.error("%s", problem)
        return 1
    _clear_stale_socket(settings.socket)
    if netns.writable_proc_sys():
        log.info("/proc/sys was read-only (managed plugin): remounted writable in the plugin's mount namespace")
    embedded: EmbeddedEtcd | None = None
    if not settings.etcd_endpoints:
        embedded = EmbeddedEtcd(settings.state_dir)
        url = embedded.start()
        settings = settings.__class__(**{**settings.__dict__, "etcd_endpoints": [url]})
        os.environ["ETCD_ENDPOINTS"] = url
    try:
        PluginServer(settings).run()
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
