#!/usr/bin/env bash
# Build a Python base image from this Debian host's own installed packages,
# for machines that cannot pull `python:3.11-slim-bookworm` from a registry.
#
#   deploy/base/build.sh [TAG]        # default beacon-base/python:3.11
#
# The image holds exactly what `python3 -m venv` and pip need, taken file by
# file from the host's Debian packages (python3.11-minimal, libpython3.11-stdlib,
# python3.11-venv, the pip/setuptools wheels, dash for /bin/sh) plus the shared
# libraries the interpreter and its extension modules link against (their ldd
# closure). Nothing is downloaded. It is imported as one layer and labelled
# with a checksum of the file list and package versions, so a second run with
# nothing changed returns at once.
set -euo pipefail
tag="${1:-beacon-base/python:3.11}"
packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11-venv
          python3-pip-whl python3-setuptools-whl dash
          libc6 libgcc-s1)  # whole: binary wheels link libpthread, libdl, libgcc_s...

missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian) for the local Python base image" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work="$(mktemp -d)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
list="$work/files"

# Shared libraries: the interpreter's and every extension module's ldd closure.
{ echo /usr/bin/python3.11; ls /usr/lib/python3.11/lib-dynload/*.so; echo /usr/bin/dash; } |
  xargs ldd 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} NF == 2 && $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' |
  sort -u >"$list.libs"

# Every file and symlink of the packages (minus documentation, translations and
# Python's own test suite) and those libraries, by canonical path: Debian
# merges /bin and /lib into /usr, and a member written through a symlinked
# directory would not unpack. A symlinked library (libfoo.so.1 ->
# libfoo.so.1.2.3) is kept as both the link and its target. (One Python
# process instead of a few thousand forks of realpath/dirname.)
{ dpkg -L "${packages[@]}"; cat "$list.libs"; } | python3 -c '
import os, sys
skip = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/lintian/", "/usr/share/locale/", "/usr/lib/python3.11/test/")
out = set()
for f in sys.stdin.read().split("\n"):
    if not f or f.startswith(skip) or os.path.isdir(f) or not os.path.lexists(f):
        continue  # directories (and the /bin -> usr/bin link) come from the skeleton
    out.add(os.path.join(os.path.realpath(os.path.dirname(f)), os.path.basename(f)))
    if ".so" in f and os.path.islink(f):
        out.add(os.path.realpath(f))
print("\n".join(sorted(p.lstrip("/") for p in out)))
' >"$list"

versions="$(dpkg-query -W -f '${Package}=${Version}\n' "${packages[@]}")"
sum="$( (echo "$versions"; cat "$list"; cat "$0") | sha256sum | cut -c1-16)"
if [ "$(docker image inspect -f '{{index .Config.Labels "beacon.base.sum"}}' "$tag" 2>/dev/null || true)" = "$sum" ]; then
  exit 0
fi

# The skeleton: merged-/usr links, python3 (dash brings /bin/sh), users, a sticky /tmp.
root="$work/root"
mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/usr/lib64" "$root/etc" "$root/tmp" "$root/opt"
chmod 1777 "$root/tmp"
ln -s usr/bin "$root/bin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s python3.11 "$root/usr/bin/python3"
ln -s python3 "$root/usr/bin/python"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nbeacon:x:10001:10001:beacon:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\nbeacon:x:10001:\n' >"$root/etc/group"

tar -C "$root" -cf "$work/rootfs.tar" --owner=0 --group=0 .
tar -C / -rf "$work/rootfs.tar" --owner=0 --group=0 --no-recursion -T "$list"
docker import \
  --change "LABEL beacon.base.sum=$sum" \
  --change 'LABEL org.opencontainers.image.description="python3.11 from the host Debian packages"' \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$work/rootfs.tar" "$tag" >/dev/null
echo "built $tag ($(wc -l <"$list") files)" >&2
