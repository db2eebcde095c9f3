"""Shared fixtures: the scripted DNS server plugin and the proxy/origin harness."""

pytest_plugins = ["tests.support.dnsserver"]
