"""pyoverlay: a Docker NetworkDriver + IpamDriver plugin giving one VXLAN overlay across Docker hosts."""

__version__ = "0.1.0"
