"""The local Docker daemon's API: events in, network and container calls out (plain Docker only).

DOCKER_HOST as the Docker CLI reads it (default unix:///var/run/docker.sock). dockerd starts its plugins
before it serves its API, so nothing here may hold up the plugin's start: one thread connects (and
reconnects, with backoff) and streams events into a queue; one worker thread runs the listeners, in
order, on every event and every few seconds besides (their periodic resync, which also retries what
failed). Listeners are plugin/docker/propagation.py (networks on every host) and plugin/docker/aliases.py (names).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import docker
import docker.errors
import requests.exceptions
from tenacity import Retrying, retry_if_exception_type, wait_exponential

log = logging.getLogger(__name__)

RESYNC = 5.0  # seconds between resyncs (they retry pending removals, re-publish what failed)
API_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class Listener(Protocol):
    def resync(self, api: DockerAPI) -> None: ...

    def on_event(self, api: DockerAPI, event: dict[str, Any]) -> None: ...


class DockerAPI:
    def __init__(self, base_url: str | None, socket_name: str, driver_name: str | None) -> None:
        self.base_url = base_url
        self.socket_name = socket_name          # a legacy plugin is known by its socket's name
        self._driver_name = driver_name
        self._client: docker.DockerClient | None = None
        self.connected = threading.Event()
        self.last_error = ""

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            kwargs: dict[str, Any] = {"version": "auto", "timeout": 10}
            self._client = (docker.DockerClient(base_url=self.base_url, **kwargs) if self.base_url
                            else docker.from_env(**kwargs))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self._client = None
        self.connected.clear()

    def driver_name(self) -> str:
        """The name Docker knows this plugin by: a managed plugin's reference (pyoverlay:latest), else the
        socket's name (pyoverlay). PYOVERLAY_DOCKER_NAME overrides."""
        if self._driver_name is None:
            name = self.socket_name
            for plugin in self.client.plugins.list():
                cfg = plugin.attrs.get("Config", {})
                if plugin.enabled and (cfg.get("Interface") or {}).get("Socket") == f"{self.socket_name}.sock" and \
                        NETWORK_DRIVER in interface_types(cfg):
                    name = plugin.name
                    break
            self._driver_name = name
            log.info("this plugin is known to Docker as %s", name)
        return self._driver_name

    def ours(self, driver: str | None) -> bool:
        return bool(driver) and driver == self.driver_name()


NETWORK_DRIVER = "docker.networkdriver/1.0"


def interface_types(cfg: dict[str, Any]) -> set[str]:
    """A plugin's interface types as config.json writes them ("docker.networkdriver/1.0"). Docker 20.10's API
    gives each as {"Prefix", "Capability", "Version"}, Docker 28's as that string."""
    out = set()
    for t in (cfg.get("Interface") or {}).get("Types") or []:
        if isinstance(t, str):
            out.add(t)
        elif isinstance(t, dict):
            out.add(f"{t.get('Prefix')}.{t.get('Capability')}/{t.get('Version')}")
    return out


class Resync:
    """The Docker worker's queue, named: Docker events go in, and so does a resync that etcd-side changes ask
    for (Propagation, when a definition changes). A burst of asks makes one resync."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.wanted = threading.Event()

    def ask(self) -> None:
        self.wanted.set()
        self.events.put({"Type": "pyoverlay", "Action": "wake"})


class DockerWatch:
    """Connect, follow events, hand them to the listeners; never blocks the caller."""

    def __init__(self, api: DockerAPI, listeners: list[Listener], resync: Resync | None = None) -> None:
        self.api = api
        self.listeners = listeners
        self.resync = resync or Resync()
        self._events = self.resync.events
        self._stop = threading.Event()
        self._resync = self.resync.wanted
        self._stream: Any = None
        self._threads = [threading.Thread(target=self._follow, name="docker-events", daemon=True),
                         threading.Thread(target=self._work, name="docker-work", daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._events.put(None)
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001
                pass
        self.api.close()

    def kick(self) -> None:
        """Resync soon (something in etcd changed); a burst of kicks makes one resync."""
        self.resync.ask()

    def _follow(self) -> None:
        retrying = Retrying(wait=wait_exponential(multiplier=0.5, max=10), retry=retry_if_exception_type(API_ERRORS),
                            before_sleep=self._log_retry, reraise=True)
        while not self._stop.is_set():
            try:
                for attempt in retrying:
                    with attempt:
                        if self._stop.is_set():
                            return
                        self._stream_events()
            except API_ERRORS:
                continue
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("following Docker events")
                time.sleep(2)

    def _log_retry(self, state: Any) -> None:
        err = state.outcome.exception() if state.outcome else None
        text = f"{type(err).__name__}: {err}" if err else "?"
        if text != self.api.last_error:
            log.warning("Docker API at %s: %s; retrying (network propagation and names wait)",
                        self.api.base_url or "DOCKER_HOST/default", text)
            self.api.last_error = text
        self.api.close()

    def _stream_events(self) -> None:
        client = self.api.client
        client.ping()
        self.api.driver_name()
        self._stream = client.events(decode=True, filters={"type": ["network", "container"]})
        self.api.connected.set()
        self.api.last_error = ""
        self.kick()  # a full resync once connected: whatever happened while we were not
        for event in self._stream:
            if self._stop.is_set():
                return
            self._events.put(event)
        if not self._stop.is_set():
            raise requests.exceptions.ConnectionError("the event stream ended")

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=RESYNC)
            except queue.Empty:
                event = None
                self._resync.set()  # quiet for a while: resync anyway (retries what failed)
            if not self.api.connected.is_set():
                continue
            if event is not None and event.get("Type") != "pyoverlay":
                self._each("on_event", event)
            if self._resync.is_set():
                self._resync.clear()
                self._each("resync")

    def _each(self, method: str, *args: Any) -> None:
        """listener.<method>(api, *args) for every listener, in order; one failing does not stop the rest."""
        for listener in self.listeners:
            try:
                getattr(listener, method)(self.api, *args)
            except API_ERRORS as err:
                log.warning("Docker API: %s (retried at the next resync)", err)
            except Exception:  # noqa: BLE001
                log.exception("Docker %s in %s", method, type(listener).__name__)


def socket_name(path: Path) -> str:
    return path.name.removesuffix(".sock")
