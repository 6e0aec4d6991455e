#!/usr/bin/env bash
# Build Beacon's image where `docker build` can reach neither a registry nor PyPI:
#
#   deploy/build-image.sh [TAG]          # default beacon:local
#
# 1. the base: $BEACON_BASE_IMAGE if set (e.g. python:3.11-slim-bookworm from
#    your registry), else deploy/base/build.sh assembles one from this host's
#    Debian packages;
# 2. the wheelhouse: this host's pip fills deploy/wheels/ with every dependency
#    (and the build backend), refreshed only when pyproject.toml changes;
# 3. `docker build --build-arg PIP_INSTALL_ARGS=--no-index`: nothing is
#    fetched during the build; unchanged layers come from Docker's cache.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="${1:-beacon:local}"
pip="${PIP:-$root/.venv/bin/pip}"
[ -x "$pip" ] || pip="pip3"

base="${BEACON_BASE_IMAGE:-}"
if [ -z "$base" ]; then
  base="beacon-base/python:3.11"
  bash "$root/deploy/base/build.sh" "$base"
fi

wheels="$root/deploy/wheels"
stamp="$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)"
if [ "$(cat "$wheels/.stamp" 2>/dev/null || true)" != "$stamp" ]; then
  echo "filling $wheels from PyPI (pip's cache)" >&2
  find "$wheels" -name '*.whl' -delete
  # Build requirements too: the image builds Beacon from source with --no-index.
  req="$(python3 -c 'import re,sys; t=open(sys.argv[1]).read(); print(" ".join(re.search(r"requires = \[(.*?)\]", t).group(1).replace("\"", "").split(",")))' "$root/pyproject.toml")"
  # shellcheck disable=SC2086
  "$pip" wheel -q --disable-pip-version-check --wheel-dir "$wheels" "$root" $req
  find "$wheels" -name 'beacon-*.whl' -delete
  echo "$stamp" >"$wheels/.stamp"
fi

old="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
docker build -q --build-arg "BASE=$base" --build-arg PIP_INSTALL_ARGS=--no-index -t "$tag" "$root" >/dev/null 2>"$log" || {
  cat "$log" >&2; exit 1; }
new="$(docker image inspect -f '{{.Id}}' "$tag")"
# The image this tag pointed to before is ours and now unnamed: free it (its
# layers that the new image shares stay, so the build cache keeps working).
if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
echo "built $tag" >&2
