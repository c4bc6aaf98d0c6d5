#!/usr/bin/env bash
# Regenerate native/patches/*.patch from a llama.cpp working tree made by dev-tree.sh:
# one patch per commit after the "pristine" commit, numbered in order.
set -euo pipefail
tree=${1:?usage: regenerate-patches.sh LLAMA_CPP_WORKTREE}
here=$(cd "$(dirname "$0")/../.." && pwd)
base=$(git -C "$tree" rev-list --max-parents=0 HEAD)
rm -f "$here"/native/patches/*.patch
git -C "$tree" format-patch --quiet --no-signature --zero-commit --no-stat -N \
    -o "$here/native/patches" "$base..HEAD"
ls "$here/native/patches"
