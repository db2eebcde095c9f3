#!/bin/sh
# What `make bench` needs beyond the virtualenv: Debian's squid (the baseline), nginx (the
# origin), wrk (absolute-form HTTP load) and Go (to build bench/loadgen, the tunnel load
# generator), and valgrind (bench/instructions.py). Installs only what is missing; builds the
# load generator into bench/.build/.
set -eu
cd "$(dirname "$0")"

missing=""
command -v squid >/dev/null 2>&1 || missing="$missing squid"
command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v go >/dev/null 2>&1 || missing="$missing golang-go"
command -v taskset >/dev/null 2>&1 || missing="$missing util-linux"
command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
if [ -n "$missing" ]; then
    echo "bench: installing$missing"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

mkdir -p .build
if [ ! -x .build/loadgen ] || [ -n "$(find loadgen -name '*.go' -newer .build/loadgen)" ]; then
    echo "bench: building the load generator"
    # Standard library only: no module download, so the build works without the Go proxy.
    (cd loadgen && GOFLAGS=-mod=mod GOPROXY=off CGO_ENABLED=0 go build -o ../.build/loadgen .)
fi
