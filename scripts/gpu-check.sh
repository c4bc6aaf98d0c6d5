#!/usr/bin/env bash
# pyadaq on an NVIDIA GPU: build with CUDA, check the CUDA backend against the CPU, run the
# test suite and the benchmarks on the GPU, and write everything to docs/gpu/<GPU>/.
#
#   scripts/gpu-check.sh [STEP...]      STEP: build ops pytest bench eval report (default: all, in order)
#
# Steps (each can be rerun alone; they share build/gpu and the output folder):
#   build   cmake + ninja: pyadaq's libraries with -DGGML_CUDA=ON for this machine's GPU
#           (CMAKE_CUDA_ARCHITECTURES=native unless CUDA_ARCH is set), plus llama-perplexity and
#           test-backend-ops (PYADAQ_TEST_BACKEND_OPS=ON; the tools are built by default). Records the build time and the number of
#           flash-attention vector-kernel instances (build.json). A step cut off by a time limit
#           continues where ninja stopped (build.json then has the last run's time only).
#   ops     llama.cpp's test-backend-ops, CUDA0 against the CPU backend: SET_ROWS, GET_ROWS and
#           CPY (all of their cases, kvq2/kvq3 included by patch 0009) and FLASH_ATTN_EXT for
#           every case with a kvq type plus upstream's q8_0/q4_0 cases; logs and ops.json.
#   pytest  the test suite with every model layer on the GPU (PYADAQ_GPU_LAYERS=999), against
#           the libraries of build/gpu; junit XML and the log.
#   bench   `pyadaq bench` on the embedded model at depths 0, 4096 and 32768: f16/f16,
#           q4_0/q4_0, q8_0/q4_0, q4_0/kvq2, q8_0/kvq2, q4_0/kvq3 (bench.json/png, BENCHMARKS.md
#           with issue 6's goals and tg against the memory-bandwidth bound when MEM_BW_GBPS is
#           known or set).
#   eval    `pyadaq eval` on the embedded model (KL against an f16 cache computed on the GPU).
#   report  docs/gpu/<GPU>/README.md from the above, naming the GPU, driver and CUDA version.
#
# Inputs, for a machine without network access (the device machines): the pinned sdist
# (PYADAQ_SDIST=path or PYADAQ_LLAMA_CPP_DIR=an unpacked vendor/llama.cpp), the embedded model
# (PYADAQ_EMBEDDED_MODEL=path to the gemma-3-270m Q4_K_M GGUF, else the installed model
# package), and a Python ($PYTHON, default python3) with numpy, matplotlib, tqdm, pytest,
# cffi, gguf and llama-cpp-python's Python layer (llama_cpp). scripts/offline-bundle.sh packs
# the source, the missing packages and the model into .offline-bundle/, which this script
# unpacks. The repository's pyadaq/ is used in place (PYTHONPATH) with the libraries in
# build/gpu/bin. pytest leaves out the `pyadaq serve` tests when llama_cpp.server's
# dependencies (FastAPI, uvicorn) are missing.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PYTHON=${PYTHON:-python3}
build=build/gpu
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(build ops pytest bench eval report)

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
if [[ -z $gpu ]]; then
    echo "gpu-check: nvidia-smi finds no GPU" >&2
    exit 2
fi
slug=$(tr '[:upper:]' '[:lower:]' <<<"$gpu" | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
out=${GPU_CHECK_OUT:-docs/gpu/$slug}
mkdir -p "$out"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYADAQ_LIB_DIR="$here/$build/bin" PYTHONUNBUFFERED=1

# A bundle from scripts/offline-bundle.sh (machines without network access)
bundle=${PYADAQ_OFFLINE_BUNDLE:-${PYADAQ_DEVICE_BUNDLE:-$here/.offline-bundle}}
if [[ -d $bundle ]]; then
    if [[ -f $bundle/src.tar.xz && -z ${PYADAQ_LLAMA_CPP_DIR:-} ]]; then
        export PYADAQ_LLAMA_CPP_DIR=/tmp/pyadaq-llama.cpp
        if [[ ! -f $PYADAQ_LLAMA_CPP_DIR/CMakeLists.txt ]]; then
            mkdir -p "$PYADAQ_LLAMA_CPP_DIR"
            tar -C "$PYADAQ_LLAMA_CPP_DIR" -xJf "$bundle/src.tar.xz"
        fi
    fi
    [[ -d $bundle/site ]] && export PYTHONPATH="$PYTHONPATH:$bundle/site"
    if [[ -f $bundle/model.count && -z ${PYADAQ_EMBEDDED_MODEL:-} ]]; then
        have=$(ls "$bundle"/model.[0-9]* 2>/dev/null | wc -l)
        if [[ $have == "$(cat "$bundle/model.count")" ]]; then
            [[ -f /tmp/pyadaq-embedded.gguf ]] || cat "$bundle"/model.[0-9]* >/tmp/pyadaq-embedded.gguf
            export PYADAQ_EMBEDDED_MODEL=/tmp/pyadaq-embedded.gguf
        else
            echo "gpu-check: $have of $(cat "$bundle/model.count") model parts here; the embedded model is not usable yet"
        fi
    fi
fi
model=${PYADAQ_MODEL:-${PYADAQ_EMBEDDED_MODEL:-}}
model_args=()
[[ -n $model ]] && model_args=(--model "$model")

# peak memory bandwidth for the tg bound (GB/s), by GPU name unless MEM_BW_GBPS is set
if [[ -z ${MEM_BW_GBPS:-} ]]; then
    case "$gpu" in
        *H100*SXM* | *"H100 80GB HBM3"*) MEM_BW_GBPS=3350 ;;
        *H100*PCIe*) MEM_BW_GBPS=2000 ;;
        *H200*) MEM_BW_GBPS=4800 ;;
        *A100*80GB*) MEM_BW_GBPS=2039 ;;
        *"RTX 4090"*) MEM_BW_GBPS=1008 ;;
        *) MEM_BW_GBPS= ;;
    esac
fi

step_build() {
    local arch=${CUDA_ARCH:-native} t0
    t0=$(date +%s)
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="$arch" -DPYADAQ_TEST_BACKEND_OPS=ON | tee "$out/build-configure.log"
    ninja -C "$build" llama ggml ggml-cuda test-backend-ops llama-perplexity 2>&1 | tail -n 20
    local secs=$(( $(date +%s) - t0 ))
    local inst
    inst=$(grep -o "pyadaq: CUDA flash-attention vector kernels: .*" "$out/build-configure.log" || true)
    "$PYTHON" -c 'import json, sys; p, s, a, i, c = sys.argv[1:]
json.dump({"seconds": int(s), "cuda_architectures": a, "instances": i, "cores": int(c)}, open(p, "w"), indent=1)' \
        "$out/build.json" "$secs" "$arch" "$inst" "$(nproc)"
    echo "gpu-check: build done in ${secs}s ($inst)"
}

step_ops() {
    local bin=$build/bin/test-backend-ops
    : >"$out/ops.log"
    for op in SET_ROWS GET_ROWS CPY; do
        echo "== $op" | tee -a "$out/ops.log"
        "$bin" test -b CUDA0 -o "$op" 2>&1 | tee -a "$out/ops.log" | tail -n 3
    done
    echo "== FLASH_ATTN_EXT (kvq)" | tee -a "$out/ops.log"
    "$bin" test -b CUDA0 -o FLASH_ATTN_EXT -p "kvq" 2>&1 | tee -a "$out/ops.log" | tail -n 3
    echo "== FLASH_ATTN_EXT (q4_0/q4_0)" | tee -a "$out/ops.log"
    "$bin" test -b CUDA0 -o FLASH_ATTN_EXT -p "type_K=q4_0,type_V=q4_0" 2>&1 | tee -a "$out/ops.log" | tail -n 3
    if "$PYTHON" - "$out/ops.log" "$out/ops.json" <<'EOF'
import json, re, sys
log, dst = sys.argv[1:]
res, section = {}, None
for line in open(log, errors="replace"):
    if line.startswith("== "):
        section = line[3:].strip()
        res[section] = {"ok": 0, "fail": 0, "not_supported": 0, "kvq_ok": 0, "kvq_fail": 0, "failures": []}
        continue
    if section is None or not re.match(r"\s+[A-Z_]+\(", line):
        continue
    r = res[section]
    kvq = "kvq" in line
    if "not supported" in line:
        r["not_supported"] += 1
    elif line.rstrip().endswith("OK"):
        r["ok"] += 1
        r["kvq_ok"] += kvq
    elif "FAIL" in line:
        r["fail"] += 1
        r["kvq_fail"] += kvq
        r["failures"].append(line.strip()[:300])
json.dump(res, open(dst, "w"), indent=1)
bad = sum(r["fail"] for r in res.values())
print(f"gpu-check: test-backend-ops: {sum(r['ok'] for r in res.values())} OK, {bad} FAIL")
sys.exit(1 if bad else 0)
EOF
    then
        echo "gpu-check: test-backend-ops passed"
    else
        echo "gpu-check: test-backend-ops FAILED (see $out/ops.json); going on with the other steps" >&2
        failed=1
    fi
}

step_pytest() {
    local deselect=()
    "$PYTHON" -c "import llama_cpp.server.app" 2>/dev/null || deselect=(-k "not serve")
    (cd tests && PYADAQ_GPU_LAYERS=999 "$PYTHON" -m pytest -q -p no:cacheprovider "${deselect[@]}" \
        --junitxml="$here/$out/pytest.xml" 2>&1 | tee "$here/$out/pytest.log" | tail -n 15) || failed=1
}

step_bench() {
    "$PYTHON" -m pyadaq bench "${model_args[@]}" --gpu-layers 999 \
        --configs f16:f16,q4_0:q4_0,q8_0:q4_0,q4_0:kvq2,q8_0:kvq2,q4_0:kvq3 --depths 0,4096,32768 --reps 3 \
        --json "$out/bench.json" --plot "$out/bench.png" --markdown "$out/BENCHMARKS.md" \
        ${MEM_BW_GBPS:+--mem-bandwidth "$MEM_BW_GBPS"} 2>&1 | tee "$out/bench.log" | tail -n 30
}

step_eval() {
    PYADAQ_GPU_LAYERS=999 "$PYTHON" -m pyadaq eval "${model_args[@]}" --no-cache \
        --configs f16:f16,q8_0:q8_0,q8_0:q4_0,q4_0:q4_0,q8_0:kvq3,q8_0:kvq2,q4_0:kvq2,kvq2:q4_0,kvq3:kvq2 \
        --json "$out/eval.json" --plot "$out/eval.png" 2>&1 | tee "$out/eval.log" | tail -n 20
}

step_report() {
    "$PYTHON" - "$out" "$gpu" <<'EOF'
import json, subprocess, sys
from pathlib import Path
out, gpu = Path(sys.argv[1]), sys.argv[2]
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
lines = [f"# pyadaq on {gpu}", "", f"- GPU: {smi}", f"- CUDA: {nvcc[-1] if nvcc else '?'}",
         "- Produced by `scripts/gpu-check.sh` (every step's log is beside this file).", ""]
b = load("build.json")
if b:
    lines += ["## Build", "", f"- {b['instances']}", f"- build time (llama, ggml-cuda, tools; {b['cores']} cores, "
              f"CUDA architectures {b['cuda_architectures']}): {b['seconds']} s", ""]
ops = load("ops.json")
if ops:
    lines += ["## test-backend-ops (CUDA0 against the CPU)", "", "| ops | OK | FAIL | not supported | kvq OK | kvq FAIL |",
              "|---|---:|---:|---:|---:|---:|"]
    for k, r in ops.items():
        lines.append(f"| {k} | {r['ok']} | {r['fail']} | {r['not_supported']} | {r['kvq_ok']} | {r['kvq_fail']} |")
    fails = [f for r in ops.values() for f in r["failures"]]
    lines += [""] + ([f"Failures:", ""] + [f"- `{f}`" for f in fails[:40]] if fails else ["No failures."]) + [""]
log = out / "pytest.log"
if log.exists():
    tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-1:]
    lines += ["## pytest with every layer on the GPU", "", f"`{tail[0] if tail else '?'}`", ""]
if (out / "BENCHMARKS.md").exists():
    lines += ["## Speed", "", "See [BENCHMARKS.md](BENCHMARKS.md) and bench.png.", ""]
ev = load("eval.json")
if ev:
    lines += ["## Quality (KL divergence against an f16 cache, on the GPU)", "", "| config | KL | PPL | top-1 |",
              "|---|---:|---:|---:|"]
    for r in ev.get("results", []):
        lines.append(f"| {r.get('k')}:{r.get('v')} | {r.get('kl_mean', float('nan')):.4f} | {r.get('ppl', float('nan')):.3f} | "
                     f"{r.get('top1', float('nan')):.4f} |")
    lines.append("")
(out / "README.md").write_text("\n".join(lines))
print(f"wrote {out / 'README.md'}")
EOF
}

failed=0
for s in "${steps[@]}"; do
    case $s in
        build | ops | pytest | bench | eval | report) echo "== gpu-check: $s ($gpu)"; "step_$s" ;;
        *) echo "gpu-check: unknown step $s (build ops pytest bench eval report)" >&2; exit 2 ;;
    esac
done
exit $failed
