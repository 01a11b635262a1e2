#!/usr/bin/env bash
# A Debian bookworm base image built offline: no registry is reachable from this machine, so
# debootstrap (minbase) fetches bookworm from the same mirror apt uses here, and `docker import`
# turns the tree into an image. Built once: an existing image of that name is kept.
#     deploy/base-image.sh [IMAGE]        (default mnist-base:bookworm)
set -euo pipefail
image=${1:-mnist-base:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists (docker rmi $image to rebuild it)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap: apt-get install debootstrap" >&2; exit 1; }

# The mirror apt uses here: deb822 (.sources) or one-line (.list) form.
mirror=$(sed -n 's/^URIs: *\(\S*debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d /var/tmp/mnist-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap --variant=minbase bookworm from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2; echo "debootstrap failed; full log: $root.log" >&2; exit 1; }
rm -f "$root.log"
# apt inside the image uses the same mirror, main and the security updates.
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$root/etc/apt/sources.list"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$image" >/dev/null
echo "built base image $image ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
