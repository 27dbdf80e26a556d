"""The HTTP face of the plugin: one thin route per Docker call, one JSON error factory.

Routes only decode (protocol.parse), dispatch, time and log; the logic lives in plugin.driver.networks and
ipam.allocator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from plugin import metrics
from plugin.api import protocol as p
from plugin.errors import InvalidRequest, MethodNotFound, PluginError, short_id
from plugin.runtime.runtime import Runtime

log = logging.getLogger("pyoverlay.calls")
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
MAX_BODY = 1 << 20

Handler = Callable[[Runtime, Any], dict[str, Any]]

# Calls answered before start-up finishes (Docker asks these first and must not wait).
_IMMEDIATE = {"Plugin.Activate", "NetworkDriver.GetCapabilities", "IpamDriver.GetCapabilities",
              "IpamDriver.GetDefaultAddressSpaces"}

ROUTES: dict[str, tuple[type[p.Request], Handler]] = {
    "Plugin.Activate": (p.Empty, lambda rt, r: {"Implements": ["NetworkDriver", "IpamDriver"]}),
    "NetworkDriver.GetCapabilities": (p.Empty, lambda rt, r: rt.driver.capabilities()),
    "NetworkDriver.CreateNetwork": (p.CreateNetwork, lambda rt, r: rt.driver.create_network(
        r.NetworkID, r.Options or {}, p.subnets(r.IPv4Data), p.subnets(r.IPv6Data))),
    "NetworkDriver.DeleteNetwork": (p.NetworkRef, lambda rt, r: rt.driver.delete_network(r.NetworkID)),
    "NetworkDriver.AllocateNetwork": (p.AllocateNetwork, lambda rt, r: rt.driver.allocate_network(r.Options or {})),
    "NetworkDriver.FreeNetwork": (p.NetworkRef, lambda rt, r: {}),
    "NetworkDriver.CreateEndpoint": (p.CreateEndpoint, lambda rt, r: rt.driver.create_endpoint(
        r.NetworkID, r.EndpointID, p.interface(r.Interface))),
    "NetworkDriver.EndpointOperInfo": (p.EndpointRef, lambda rt, r: rt.driver.endpoint_info(r.NetworkID, r.EndpointID)),
    "NetworkDriver.DeleteEndpoint": (p.EndpointRef, lambda rt, r: rt.driver.delete_endpoint(r.NetworkID, r.EndpointID)),
    "NetworkDriver.Join": (p.Join, lambda rt, r: rt.driver.join(r.NetworkID, r.EndpointID, r.SandboxKey)),
    "NetworkDriver.Leave": (p.EndpointRef, lambda rt, r: rt.driver.leave(r.NetworkID, r.EndpointID)),
    "NetworkDriver.DiscoverNew": (p.Discover, lambda rt, r: {}),
    "NetworkDriver.DiscoverDelete": (p.Discover, lambda rt, r: {}),
    # pyoverlay returns no Gateway from Join, so Docker gives egress and -p through docker_gwbridge.
    "NetworkDriver.ProgramExternalConnectivity": (p.ExternalConnectivity, lambda rt, r: {}),
    "NetworkDriver.RevokeExternalConnectivity": (p.EndpointRef, lambda rt, r: {}),
    "IpamDriver.GetCapabilities": (
        p.Empty, lambda rt, r: {"RequiresMACAddress": False, "RequiresRequestReplay": False}),
    "IpamDriver.GetDefaultAddressSpaces": (p.Empty, lambda rt, r: rt.ipam.address_spaces()),
    "IpamDriver.RequestPool": (
        p.RequestPool, lambda rt, r: rt.ipam.request_pool(r.Pool, r.SubPool, r.Options or {}, r.V6)),
    "IpamDriver.ReleasePool": (p.PoolRef, lambda rt, r: rt.ipam.release_pool(r.PoolID)),
    "IpamDriver.RequestAddress": (
        p.RequestAddress, lambda rt, r: rt.ipam.request_address(r.PoolID, r.Address, r.Options or {})),
    "IpamDriver.ReleaseAddress": (p.ReleaseAddress, lambda rt, r: rt.ipam.release_address(r.PoolID, r.Address)),
}


def _reply(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type=CONTENT_TYPE)


def _body() -> bytes:
    """The request body, refused past MAX_BODY (Docker's largest calls are a few KiB)."""
    if (request.content_length or 0) > MAX_BODY:
        # Read (a bounded amount of) it first, so the caller gets this answer rather than a reset connection.
        for _ in range(8):
            if not request.environ["wsgi.input"].read(MAX_BODY):
                break
        raise InvalidRequest(f"request body of {request.content_length} bytes; pyoverlay takes at most {MAX_BODY}")
    try:
        return request.get_data(cache=False)  # a chunked body is cut at MAX_CONTENT_LENGTH too
    except RequestEntityTooLarge:
        raise InvalidRequest(f"request body larger than {MAX_BODY} bytes") from None


def _ids(req: Any) -> str:
    out = []
    for field, label in (("NetworkID", "network"), ("EndpointID", "endpoint"), ("PoolID", "pool"),
                         ("Pool", "subnet"), ("Address", "address")):
        value = getattr(req, field, None)
        if value:
            out.append(f"{label}={short_id(value) if field.endswith('ID') and field != 'PoolID' else value}")
    return " ".join(out)


def _view(rt: Runtime, call: str, model: type[p.Request], handler: Handler) -> Callable[[], Response]:
    def view() -> Response:
        start = time.perf_counter()
        req: Any = None
        try:
            raw = _body()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("call=%s body=%s", call, raw[:2000].decode(errors="replace"))
            req = p.parse(model, raw, call)
            if call not in _IMMEDIATE:
                rt.wait_ready()
            body, status, outcome = handler(rt, req), 200, "ok"
        except PluginError as err:
            body, status, outcome = {"Err": err.message}, err.status, f"err={json.dumps(err.message)}"
            metrics.CALL_ERRORS.labels(call).inc()
        except Exception as err:  # noqa: BLE001 - the one place that turns surprises into an Err
            logging.getLogger(__name__).exception("%s failed", call)
            msg = f"internal error in pyoverlay ({type(err).__name__}: {err}); see the plugin log"
            body, status, outcome = {"Err": msg}, 500, f"err={json.dumps(msg)}"
            metrics.CALL_ERRORS.labels(call).inc()
        seconds = time.perf_counter() - start
        metrics.CALL_SECONDS.labels(call).observe(seconds)
        log.info("call=%s %s ms=%.2f outcome=%s", call, _ids(req) if req is not None else "", seconds * 1000,
                 outcome)
        return _reply(body, status)

    view.__name__ = call
    return view


def create_app(rt: Runtime) -> Flask:
    app = Flask("pyoverlay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    for call, (model, handler) in ROUTES.items():
        app.add_url_rule(f"/{call}", endpoint=call, view_func=_view(rt, call, model, handler), methods=["POST"])

    # The operator commands (pyoverlay status/inspect/doctor/gc), not Docker calls.
    def operator(fn: Callable[[], Any]) -> Response:
        try:
            return Response(json.dumps(fn()), content_type="application/json")
        except PluginError as err:
            return Response(json.dumps({"Err": err.message}), status=err.status, content_type="application/json")

    app.add_url_rule("/pyoverlay/status", "status", lambda: operator(rt.status))
    app.add_url_rule("/pyoverlay/inspect/<path:name>", "inspect", lambda name: operator(lambda: rt.inspect(name)))
    app.add_url_rule("/pyoverlay/doctor", "doctor", lambda: operator(rt.doctor))
    app.add_url_rule("/pyoverlay/gc", "gc", lambda: operator(lambda: rt.gc(request.method == "POST")),
                     methods=["GET", "POST"])

    @app.errorhandler(404)
    @app.errorhandler(405)
    def unknown(err: Exception) -> Response:
        err_obj = MethodNotFound(f"{request.path.lstrip('/')}: method not implemented by pyoverlay")
        log.info("call=%s ms=0 outcome=err=%s", request.path.lstrip("/"), json.dumps(err_obj.message))
        return _reply({"Err": err_obj.message}, err_obj.status)

    return app
