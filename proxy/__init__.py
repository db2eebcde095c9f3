"""Outgate: a forward egress proxy that decides every connection by per-workload policy."""

from proxy import native

__version__ = "0.1.0"

# Compiled modules or pure Python, decided before any of them is imported (proxy/native.py).
native.choose()
