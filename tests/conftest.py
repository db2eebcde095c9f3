"""Shared fixtures: the scripted DNS server, real origins, and proxies started as the CLI does."""

pytest_plugins = ["tests.support.dnsserver", "tests.support.fixtures"]
