#!/usr/bin/env bash
# Make a llama.cpp working tree for patch work: the pinned upstream as a "pristine"
# commit, then one commit per patch in native/patches. Edit, commit, and run
# regenerate-patches.sh on it. The source comes from PYADAQ_LLAMA_CPP_DIR or the
# pinned sdist (fetched and checked by native/cmake/fetch_upstream.cmake).
set -euo pipefail
out=${1:?usage: dev-tree.sh OUTDIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
[ -e "$out" ] && { echo "$out exists; choose a new directory" >&2; exit 1; }
src=$(cmake -DPYADAQ_WORK_DIR="$(mktemp -d)" -P "$here/native/cmake/fetch_upstream.cmake" 2>&1 | sed -n 's/^-- pyadaq upstream source: //p')
[ -n "$src" ] || { echo "could not obtain the pinned llama.cpp source" >&2; exit 1; }
mkdir -p "$out"
cp -r "$src"/. "$out"/
rm -f "$out/.git"
G="git -C $out -c user.name=pyadaq -c user.email=pyadaq@localhost"
$G init -q
$G add -A
$G commit -qm pristine
for p in "$here"/native/patches/*.patch; do $G am -q "$p"; done
git -C "$out" log --oneline
