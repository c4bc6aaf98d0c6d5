#!/usr/bin/env bash
# Everything pyadaq's install needs on a machine without network access, in .offline-bundle/
# (git-ignored; OUT as the first argument to put it elsewhere):
#
#   src.tar.xz     the pinned llama.cpp source (vendor/llama.cpp of the checked sdist), without
#                  its models/, docs/, examples/ and benches/ (about 10 MB): unpack it and point
#                  PYADAQ_LLAMA_CPP_DIR at it
#   wheels/        every wheel `pip install` needs, for the Python and platform of the target
#                  (PY_VERSION, default this interpreter's; PLATFORM, default manylinux x86-64):
#                  pyadaq's dependencies, its build backend, and llama-cpp-python's Python layer
#                  built here without libraries of its own (pyadaq provides them)
#   site/          the pure-Python packages and cffi unpacked, for scripts/gpu-check.sh, which runs
#                  pyadaq from the source tree on a machine whose Python has no pip access
#   model.NN       the embedded model in parts of 45 MB (the device tool carries at most 64 MiB
#                  a call), model.count, and INSTALL.md with the commands below
#
#   scripts/offline-bundle.sh [OUT]          (after `make install`, which makes .venv)
#
# On the offline machine (see INSTALL.md in the bundle and docs/CUDA.md):
#   mkdir llama.cpp && tar -C llama.cpp -xJf src.tar.xz
#   python -m venv .venv && .venv/bin/pip install --no-index --find-links wheels llama-cpp-python==0.3.36
#   PYADAQ_LLAMA_CPP_DIR=$PWD/llama.cpp .venv/bin/pip install --no-index --find-links wheels /path/to/pyadaq
#   cat model.[0-9]* > gemma3-270m.gguf; export PYADAQ_EMBEDDED_MODEL=$PWD/gemma3-270m.gguf
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/.offline-bundle}
venv=${VENV:-$here/.venv}
py_version=${PY_VERSION:-$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
platform=${PLATFORM:-manylinux2014_x86_64}
mkdir -p "$out"

src=$(cmake -DPYADAQ_WORK_DIR="$(mktemp -d)" -P "$here/native/cmake/fetch_upstream.cmake" 2>&1 |
      sed -n 's/^-- pyadaq upstream source: //p')
[ -n "$src" ] || { echo "offline-bundle: could not obtain the pinned llama.cpp source" >&2; exit 1; }
tar -C "$src" --exclude=./models --exclude=./docs --exclude=./examples --exclude=./benches \
    --exclude=./media --exclude=./.git -cJf "$out/src.tar.xz" .
echo "offline-bundle: src.tar.xz $(du -h "$out/src.tar.xz" | cut -f1)"

# wheels: llama-cpp-python's Python layer built here (no native build), then everything the two
# installs need, resolved by pip for the target Python and platform
wheels=$out/wheels
rm -rf "$wheels"
mkdir -p "$wheels"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$venv/bin/python" -m pip wheel --quiet --no-deps \
    -w "$wheels" "llama-cpp-python==0.3.36"
reqs=$("$venv/bin/python" - "$here/pyproject.toml" <<'PY'
import sys, tomllib
meta = tomllib.load(open(sys.argv[1], "rb"))
deps = [d for d in meta["project"]["dependencies"] if not d.startswith("llama-cpp-python")]
deps += meta["build-system"]["requires"] + meta["project"]["optional-dependencies"]["plots"]
deps += ["typing-extensions>=4.5.0", "diskcache>=5.6.1", "jinja2>=2.11.3"]  # llama-cpp-python's own
print("\n".join(deps))
PY
)
# shellcheck disable=SC2086
"$venv/bin/python" -m pip download --quiet --only-binary=:all: --python-version "$py_version" \
    --platform "$platform" --platform manylinux_2_17_x86_64 --platform any -d "$wheels" $reqs
echo "offline-bundle: wheels/ $(ls "$wheels" | wc -l) files, $(du -sh "$wheels" | cut -f1), for Python $py_version"

site=$out/site
rm -rf "$site"
mkdir -p "$site"
sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for pkg in llama_cpp gguf diskcache pycparser; do
    cp -r "$sp/$pkg" "$site/"
done
rm -rf "$site/llama_cpp/lib" # pyadaq provides the libraries
find "$site" -name __pycache__ -prune -exec rm -rf {} +
for whl in "$wheels"/cffi-*.whl; do
    "$venv/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$site"
done
echo "offline-bundle: site/ $(du -sh "$site" | cut -f1)"

model=$(cd / && "$venv/bin/python" -c 'from pyadaq.model.embedded import embedded_model_path; print(embedded_model_path())')
rm -f "$out"/model.*
split -d -b 45M "$model" "$out/model."
n=$(ls "$out"/model.[0-9]* | wc -l)
echo "$n" >"$out/model.count"
sed -n 's/^#   \(mkdir\|python\|PYADAQ\|cat\)/\1/p' "$0" | sed '1i # Installing pyadaq from this bundle, offline\n' >"$out/INSTALL.md"
echo "offline-bundle: $n model parts of $(basename "$model"); INSTALL.md"
