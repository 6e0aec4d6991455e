#!/usr/bin/env bash
# Build the images the test suite runs (no registry can be reached: build from
# Debian's busybox-static). Idempotent; rebuilds only when the Dockerfile changes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="beacon-test/busybox:latest"
if ! dpkg -s busybox-static >/dev/null 2>&1; then
  echo "installing busybox-static (Debian) for the test images" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
ctx="$here/.build/busybox"
mkdir -p "$ctx"
cp "$here/busybox/Dockerfile" "$ctx/Dockerfile"
cp -L /bin/busybox "$ctx/busybox"
sum=$(cat "$ctx/Dockerfile" "$ctx/busybox" | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "beacon.test.sum"}}' "$tag" 2>/dev/null || true)" = "$sum" ]; then
  exit 0
fi
docker build -q --label "beacon.test.sum=$sum" -t "$tag" "$ctx" >/dev/null
echo "built $tag" >&2
