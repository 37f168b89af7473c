#!/usr/bin/env bash
# Makes the base image the Containerfile builds FROM, without any container registry: a Debian
# minbase root file system made by debootstrap from Debian's own packages, imported with
# `podman import`. Run as root (debootstrap needs it). Prints the image name on stdout.
#
#   container/make-base-image.sh [IMAGE]     default IMAGE: localhost/einvoice-gateway-base:<suite>-<key>
#
# The root file system is cached as a tarball in $EINVOICE_GATEWAY_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/einvoice-gateway), keyed by the suite, architecture and package
# list, so a second run only imports it (or finds the image already there).
# The Debian mirror is $DEBIAN_MIRROR, else the first one this machine's apt sources name for the suite.
set -euo pipefail

suite=${DEBIAN_SUITE:-bookworm}
# What the daemon needs at run time besides its wheels: Debian's Python (bookworm: 3.11, the wheels'
# ABI) with venv, the system trust store for https destinations and the smarthost, and tini (PID 1:
# passes signals on and reaps orphaned processes).
packages=python3,python3-venv,ca-certificates,tini
arch=$(dpkg --print-architecture)
key=$(printf '%s\n' "$suite" "$arch" "$packages" "minbase" | sha256sum | cut -c1-12)
image=${1:-localhost/einvoice-gateway-base:$suite-$key}
cache=${EINVOICE_GATEWAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/einvoice-gateway}
tarball=$cache/base-$suite-$arch-$key.tar

say() { echo "make-base-image: $*" >&2; }

if podman image exists "$image"; then
  say "$image exists"; echo "$image"; exit 0
fi

mirror_from_apt_sources() {
  # One-line format: "deb [options] URI SUITE COMPONENTS..."
  if [ -f /etc/apt/sources.list ]; then
    awk -v s="$suite" '$1 == "deb" { sub(/\[[^]]*\] */, ""); if ($3 == s) { print $2; exit } }' /etc/apt/sources.list
  fi
  # deb822 format: a stanza with "Types: deb", "URIs: ..." and the suite among "Suites: ...".
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$suite" '
      function flush() { if (deb && hit && uri != "") { print uri; found = 1; exit } deb = hit = 0; uri = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) hit = 1 }
      END { if (!found) flush() }' "$f"
  done
  # Sources in sources.list.d/*.list use the one-line format too.
  for f in /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$suite" '$1 == "deb" { sub(/\[[^]]*\] */, ""); if ($3 == s) { print $2; exit } }' "$f"
  done
}

if [ ! -f "$tarball" ]; then
  for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { say "$tool is missing: apt-get install -y debootstrap podman"; exit 2; }
  done
  [ "$(id -u)" = 0 ] || { say "debootstrap needs root: run this as root (or give a cached tarball in $cache)"; exit 2; }
  mirror=${DEBIAN_MIRROR:-$(mirror_from_apt_sources | head -n1)}
  [ -n "$mirror" ] || { say "no Debian mirror for $suite in /etc/apt/sources*; set DEBIAN_MIRROR=<URL>"; exit 2; }
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/.rootfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  say "debootstrap $suite ($arch) from $mirror with $packages"
  debootstrap --variant=minbase --arch="$arch" --include="$packages" "$suite" "$work/root" "$mirror" >&2
  # What only the build needed: downloaded packages and package lists.
  rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/* "$work"/root/var/log/*.log
  tar --numeric-owner --xattrs -C "$work/root" -cf "$work/base.tar" .
  mv "$work/base.tar" "$tarball"
fi
say "importing $tarball as $image"
podman import --message "debootstrap $suite minbase: $packages" "$tarball" "$image" >/dev/null
echo "$image"
