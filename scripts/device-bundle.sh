#!/usr/bin/env bash
# Everything scripts/gpu-check.sh needs on a GPU machine that cannot reach the network (the
# device machines this project is sometimes lent), in .device-bundle/ (git-ignored):
#
#   src.tar.xz     the pinned llama.cpp source (vendor/llama.cpp of the checked sdist),
#                  without its models/, docs/, examples/ and benches/ (about 10 MB)
#   site/          pure-Python packages pyadaq needs that the machine's Python lacks, copied
#                  from this checkout's .venv (llama_cpp without its libraries, gguf,
#                  diskcache, pycparser) and cffi for CPython 3.12 from PyPI
#   model.NN       the embedded model in parts of 45 MB (a call carries at most 64 MiB)
#
#   scripts/device-bundle.sh            (after `make install`, which makes .venv)
#
# On the machine, gpu-check.sh picks the bundle up (PYADAQ_DEVICE_BUNDLE, default
# .device-bundle): it unpacks the source, puts site/ on PYTHONPATH and joins the model parts
# once all of them are there. A call may carry `.device-bundle/src.tar.xz`,
# `.device-bundle/site` and one or two model parts; parts carried by earlier calls stay on a
# warm machine. See docs/CUDA.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/.device-bundle
venv=${VENV:-$here/.venv}
mkdir -p "$out"

src=$(cmake -DPYADAQ_WORK_DIR="$(mktemp -d)" -P "$here/native/cmake/fetch_upstream.cmake" 2>&1 |
      sed -n 's/^-- pyadaq upstream source: //p')
[ -n "$src" ] || { echo "device-bundle: could not obtain the pinned llama.cpp source" >&2; exit 1; }
tar -C "$src" --exclude=./models --exclude=./docs --exclude=./examples --exclude=./benches \
    --exclude=./media --exclude=./.git -cJf "$out/src.tar.xz" .
echo "device-bundle: src.tar.xz $(du -h "$out/src.tar.xz" | cut -f1)"

site=$out/site
rm -rf "$site"
mkdir -p "$site"
sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for pkg in llama_cpp gguf diskcache pycparser; do
    cp -r "$sp/$pkg" "$site/"
done
rm -rf "$site/llama_cpp/lib" # pyadaq provides the libraries
find "$site" -name __pycache__ -prune -exec rm -rf {} +
tmp=$(mktemp -d)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" cffi
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$tmp"/cffi-*.whl "$site"
rm -rf "$tmp"
echo "device-bundle: site/ $(du -sh "$site" | cut -f1)"

model=$(cd / && "$venv/bin/python" -c 'from pyadaq.embedded import embedded_model_path; print(embedded_model_path())')
rm -f "$out"/model.*
split -d -b 45M "$model" "$out/model."
n=$(ls "$out"/model.* | wc -l)
echo "$n" >"$out/model.count"
echo "device-bundle: $n model parts of $(basename "$model")"
