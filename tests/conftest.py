"""Shared fixtures: the scripted DNS server, real origins, and proxies started as the CLI does."""

import os

pytest_plugins = ["tests.support.dnsserver", "tests.support.fixtures"]

# tests/netns aims the proxy at metadata, private and public-looking addresses: it is collected
# only inside the network namespace that tests/test_netns_suite.py creates for it.
if os.environ.get("OUTGATE_IN_NETNS") != "1":
    collect_ignore = ["netns"]
