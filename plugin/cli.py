"""The `pyoverlay` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from plugin import __version__, config


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def _logging(level: str) -> None:
    """Ordinary lines to stdout, warnings and errors to stderr: dockerd files a managed plugin's stdout at
    level=info and its stderr at level=error, so a healthy plugin must not write its INFO lines to stderr."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(fmt)
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[out, err], force=True)
    for noisy in ("pyroute2", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyoverlay", description="Docker VXLAN overlay network plugin")
    parser.add_argument("--version", action="version", version=f"pyoverlay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the plugin (settings from the environment; see README)")
    st = sub.add_parser("status", help="this host: networks, peers, Docker API, propagation, names")
    st.add_argument("--json", action="store_true", help="machine-readable")
    ins = sub.add_parser("inspect", help="one network across the cluster: hosts, endpoints, addresses")
    ins.add_argument("network", help="Docker network name or ID on this host, or cluster key (10.20.0.0_24)")
    ins.add_argument("--json", action="store_true", help="machine-readable")
    doc = sub.add_parser("doctor", help="check this host for what stops pyoverlay, with the fix for each")
    doc.add_argument("--json", action="store_true", help="machine-readable")
    gcp = sub.add_parser("gc", help="what the reconciler would remove (nothing owns it); --apply removes it")
    gcp.add_argument("--apply", action="store_true", help="remove it now instead of after the grace period")
    gcp.add_argument("--json", action="store_true", help="machine-readable")
    args = parser.parse_args(argv)
    if args.command != "serve" and not os.environ.get("PYOVERLAY_SOCKET") \
            and not os.path.exists(config.DEFAULT_SOCKET):
        from plugin.ops.commands import adopt_managed

        name = adopt_managed(os.environ)  # type: ignore[arg-type]
        if name:
            print(f"pyoverlay: the managed plugin {name} (socket {os.environ['PYOVERLAY_SOCKET']})", file=sys.stderr)
    try:
        settings = config.load()
    except config.ConfigError as err:
        print(f"pyoverlay: {err}", file=sys.stderr)
        return 2
    _logging(settings.log_level)
    if args.command == "serve":
        from plugin.api.server import serve

        return serve(settings)
    else:
        from plugin.ops import commands

        if args.command == "status":
            return commands.status(settings, as_json=args.json)
        if args.command == "inspect":
            return commands.inspect(settings, args.network, as_json=args.json)
        if args.command == "doctor":
            return commands.doctor(settings, as_json=args.json)
        if args.command == "gc":
            return commands.gc(settings, apply=args.apply, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
