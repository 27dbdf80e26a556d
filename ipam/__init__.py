"""Cluster-wide IP address management for pyoverlay, backed by etcd transactions."""
