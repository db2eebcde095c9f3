"""Outgate: a forward egress proxy that decides every connection by per-workload policy."""

__version__ = "0.1.0"
