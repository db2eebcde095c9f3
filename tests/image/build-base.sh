#!/bin/sh
# The image tier's base image without an image registry: Debian bookworm's Python 3.11 from
# Debian packages, the same interpreter python:3.11-slim-bookworm is built around.
#   sh tests/image/build-base.sh ENGINE TAG
# Made once per machine (about a minute: debootstrap, then the bookworm-updates and security
# upgrades): the root filesystem is kept as a tarball in the cache directory, and only imported
# again when the engine's store has lost the image. Needs root (debootstrap, chroot).
# Exit 3: this machine cannot make it (the message says why); anything else is a failure.
set -eu
engine=$1
tag=$2
cache=${OUTGATE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outgate-image}
tarball=$cache/bookworm-python-3.11.tar
mkdir -p "$cache"
# One maker per machine: a second test run waits here, then imports the first one's tarball.
exec 9>"$cache/lock"
flock 9

# The first archive URL of apt's sources (one-line or deb822 form) matching $1, else $2.
apt_uri() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -v '^[[:space:]]*#' | grep -oE '(https?|ftp)://[^[:space:]]+' \
        | grep -E "$1" | head -n 1 | grep . || echo "$2"
}

if [ ! -s "$tarball" ]; then
    debootstrap=$(command -v debootstrap || ls /usr/sbin/debootstrap 2>/dev/null || true)
    if [ -z "$debootstrap" ] || [ "$(id -u)" != 0 ]; then
        echo "making the base image needs root and debootstrap (make install-test installs it)" >&2
        exit 3
    fi
    mirror=$(apt_uri '/debian/?$' http://deb.debian.org/debian)
    security=$(apt_uri '/debian-security/?$' http://deb.debian.org/debian-security)
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    chmod 755 "$rootfs"  # apt fetches as its _apt user
    trap 'rm -rf "$rootfs" "$tarball.part"' EXIT
    echo "making the base image from $mirror (once per machine, about a minute)" >&2
    "$debootstrap" --variant=minbase --include=python3,python3-venv,python-is-python3 \
        bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 5 "$cache/debootstrap.log" >&2; exit 3; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
    { chroot "$rootfs" apt-get update -qq &&
      chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq &&
      chroot "$rootfs" apt-get clean; } >"$cache/upgrade.log" 2>&1 \
        || { tail -n 5 "$cache/upgrade.log" >&2; exit 1; }
    # What slim images leave out too: documentation, manuals and translations (45 MB).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* \
        "$rootfs"/tmp/* "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
"$engine" import "$tarball" "$tag" >/dev/null
