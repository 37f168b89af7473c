#!/usr/bin/env bash
# Builds the einvoice-gateway image from this checkout with podman, without a registry or network in
# the build: the base image (container/make-base-image.sh), wheels of the project and of every
# dependency (made here with pip), then `podman build` with the Containerfile. Prints the image name.
#
#   container/build-image.sh [TAG]        default TAG: localhost/einvoice-gateway:<version>
#
# PYTHON names the interpreter whose pip makes the wheels (default python3); it must be the base
# image's Python version (Debian bookworm: 3.11), or the compiled wheels would not load in the image.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
say() { echo "build-image: $*" >&2; }

want=3.11
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "$want" ] || { say "$python is Python $have; the image runs Python $want: set PYTHON=<a python$want>"; exit 2; }
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/gateway/__init__.py")
tag=${1:-localhost/einvoice-gateway:$version}

base=$("$root/container/make-base-image.sh")
context=$(mktemp -d "${TMPDIR:-/tmp}/einvoice-gateway-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
say "wheels of einvoice-gateway $version and its dependencies"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$context/wheels" "$root" >&2
mkdir -p "$context/container" "$context/console"
cp "$root/container/readyz.py" "$context/container/"
htmx=node_modules/htmx.org/dist/htmx.min.js
if [ -f "$root/$htmx" ]; then
  mkdir -p "$context/console/$(dirname "$htmx")" && cp "$root/$htmx" "$context/console/$htmx"
else
  say "no $htmx (run npm ci first): the console will work without live search"
fi
# RUN steps use chroot isolation: no OCI runtime is needed to build (only to run).
say "podman build $tag from $base"
podman build --quiet --format docker --isolation chroot --build-arg "BASE=$base" \
  -f "$root/Containerfile" -t "$tag" "$context" >&2
echo "$tag"
