#!/bin/sh
# Runs inside `unshare -n` (a fresh network namespace with only a loopback device, made by
# tests/test_netns_suite.py). Binds the metadata, private and public-looking addresses the
# guard tests aim at on this namespace's loopback, so a guard bug reaches nothing real; and the
# public-looking address of the real-client range's origin (tests/support/clientrange.py), and
# the transparent-mode listener and canary addresses (tests/support/transparent.py).
set -eu
ip link set lo up
for address in 169.254.169.254/32 169.254.170.2/32 10.0.0.5/32 172.16.5.5/32 \
               192.168.1.10/32 100.64.0.1/32 11.0.0.1/32 11.0.0.2/32 11.0.0.3/32 11.0.0.20/32 \
               11.0.0.4/32 11.0.0.5/32; do
    ip addr add "$address" dev lo
done
ip -6 addr add fd00:ec2::254/128 dev lo
ip -6 addr add 2001:4860::1/128 dev lo
export OUTGATE_IN_NETNS=1
exec "$@"
