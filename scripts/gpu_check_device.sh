#!/usr/bin/env bash
# The GPU check on a GPU machine without network, in one command (see docs/gpu.md).
#
# It expects nvcc, Python 3.12 with numpy, psutil, nvidia-ml-py, jinja2 and NVIDIA's
# nvidia-cublas / nvidia-cuda-runtime wheels, and no network: what localllm needs beyond that
# travels in .gpu-carry/ (git-ignored), made first on a machine with network:
#
#   scripts/gpu_check_device.sh prepare --venv /work/cuda-venv   # with network: fills .gpu-carry/
#   scripts/gpu_check_device.sh run                              # on the GPU machine: about 7 minutes
#
# prepare --venv packs llama-cpp-python's CUDA build from a venv made by
#   scripts/install-cuda-backend.sh --venv /work/cuda-venv --arch 90   (90: H100/H200)
# (its libraries find cuBLAS through $ORIGIN/../../nvidia/cu13/lib), plus the wheels of the pure
# Python packages the machine lacks. run unpacks them into /tmp, points nvidia/cu13 at the
# machine's own cuBLAS and CUDA runtime, and runs scripts/gpu_check.py into $OUT (or --out DIR).
#
# prepare --sources SDIST packs llama-cpp-python's sources instead, trimmed to what a CUDA build
# reads (a few MB); run then builds them there first with install-cuda-backend.sh and gives the
# check what is left of its budget.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$HERE/.gpu-carry
# localllm's imports that the GPU image lacks, at the versions localllm's venv has.
WHEELS=(gguf pydantic pydantic-core pydantic-settings annotated-types typing-inspection
    python-dotenv diskcache)

die() { echo "gpu_check_device: $*" >&2; exit 1; }

pack_build() {  # llama_cpp as installed in a venv, its libraries stripped of unneeded symbols
    local venv=$1 site stage
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ls "$site"/llama_cpp/lib/libggml-cuda.so >/dev/null 2>&1 \
        || die "$venv has no CUDA build of llama-cpp-python (no llama_cpp/lib/libggml-cuda.so)"
    stage=$(mktemp -d)
    cp -a "$site/llama_cpp" "$stage/"
    find "$stage/llama_cpp" -name '__pycache__' -prune -exec rm -rf {} +
    # The wheel installs each library three times (libx.so, its soname libx.so.0, libx.so.0.25.3):
    # keep the last, link the others to it.
    local full alias
    for full in "$stage"/llama_cpp/lib/*.so.*.*; do
        for alias in "${full%%.so.*}.so" "${full%.*.*}"; do
            if [ "$alias" != "$full" ] && cmp -s "$alias" "$full"; then
                ln -sf "$(basename "$full")" "$alias"
            fi
        done
    done
    find "$stage/llama_cpp/lib" -name '*.so*' -type f -exec strip --strip-unneeded {} +
    du -b "$stage"/llama_cpp/lib/*.so* | sort -n | tail -n 4
    tar -C "$stage" -cf - llama_cpp | xz -T0 -6 >"$CARRY/llama_cpp.tar.xz"
    rm -rf "$stage"
}

pack_sources() {  # the sdist without what a CUDA build of the Python package never reads
    local sdist=$1 stage top
    stage=$(mktemp -d)
    tar -xzf "$sdist" -C "$stage"
    top=$(find "$stage" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    local lc=$top/vendor/llama.cpp
    rm -rf "${top:?}/.git" "${lc:?}/.git" "${lc:?}/models" "${lc:?}/docs" "${lc:?}/tests" \
        "${lc:?}/benches" "${lc:?}/examples" "${lc:?}/media" "${lc:?}/.github" "${lc:?}/gguf-py"
    for backend in "$lc"/ggml/src/ggml-*/; do
        case "$backend" in */ggml-cpu/|*/ggml-cuda/|*/ggml-blas/|*/ggml-rpc/) ;;
            *) rm -rf "$backend" ;; esac
    done
    for tool in "$lc"/tools/*/; do
        case "$tool" in */mtmd/) ;; *) rm -rf "$tool" ;; esac
    done
    mv "$top" "$stage/llama-src"
    tar -C "$stage" -cf - llama-src | xz -T0 -6 >"$CARRY/llama-src.tar.xz"
    rm -rf "$stage"
}

prepare() {
    local venv="" sdist="" py="" version
    while [ $# -gt 0 ]; do
        case "$1" in
            --venv) venv=$2; shift ;;
            --sources) sdist=$2; shift ;;
            --python) py=$2; shift ;;
            *) die "prepare: unknown option $1" ;;
        esac
        shift
    done
    [ -n "$venv$sdist" ] || die "prepare: give --venv DIR (a CUDA build) or --sources SDIST"
    py=${py:-$HERE/.venv/bin/python}
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
    if [ -n "$venv" ]; then pack_build "$venv"; else pack_sources "$sdist"; fi
    for name in "${WHEELS[@]}"; do
        version=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")
        "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$name==$version"
    done
    du -ab "$CARRY" | sort -n | tail -n 12
    echo "carry .gpu-carry: $(du -sb "$CARRY" | cut -f1) bytes (the limit is 64 MiB, the repo included)"
}

run() {
    local out=${OUT:-$HERE/gpu-check-out} budget=420 py=python3
    while [ $# -gt 0 ]; do
        case "$1" in
            --out) out=$2; shift ;;
            --budget-s) budget=$2; shift ;;
            --python) py=$2; shift ;;
            *) die "run: unknown option $1" ;;
        esac
        shift
    done
    local site=/tmp/localllm-site started=$SECONDS
    rm -rf "$site" && mkdir -p "$site/nvidia" "$out"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$CARRY"/wheels/*.whl
    if [ -f "$CARRY/llama_cpp.tar.xz" ]; then
        xz -dc "$CARRY/llama_cpp.tar.xz" | tar -C "$site" -xf -
    elif [ -f "$CARRY/llama-src.tar.xz" ]; then
        build_there "$py" "$out"
        # Leave the check what is left of the command's 10 minutes, and a minute to spare.
        budget=$(( budget < 540 - SECONDS ? budget : 540 - SECONDS ))
        echo "# built in $((SECONDS - started)) s; the check gets $budget s"
    else
        die "nothing in .gpu-carry/: run 'prepare' first"
    fi
    # The build looks for cuBLAS and the CUDA runtime in ../../nvidia/cu13/lib from its own
    # folder: give it the ones this machine's Python already has.
    local cu13
    cu13=$("$py" - <<'EOF'
import site, glob
for root in site.getsitepackages():
    for hit in glob.glob(f"{root}/nvidia/cu13/lib/libcublas.so.13"):
        print(hit.rsplit("/lib/", 1)[0])
        raise SystemExit
raise SystemExit("no nvidia/cu13/lib/libcublas.so.13 in this Python's site-packages")
EOF
)
    # (A build made here found them by itself: it went into that Python's own site-packages.)
    if [ -d "$site/llama_cpp" ]; then ln -sfn "$cu13" "$site/nvidia/cu13"; fi
    export PYTHONPATH=$site:$HERE PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv \
        >"$out/nvidia-smi.txt" 2>&1 || true
    cat "$out/nvidia-smi.txt"
    echo "# set up in $((SECONDS - started)) s"
    # doctor on this build: the CUDA backend and the card it sees. Its repacked-weights probe
    # wants the embedded model, which is not here: run that probe first on a small sparse model
    # (as gpu_check does), so doctor reads the answer from its cache.
    "$py" -c 'import sys, pathlib; sys.path.insert(0, sys.argv[1]); import gpu_check
gpu_check.real_hardware("gpu", pathlib.Path("/tmp/gpu-check-models"))' "$HERE/scripts" || true
    "$py" -m localllm doctor >"$out/doctor.txt" 2>&1 || true
    head -n 30 "$out/doctor.txt"
    "$py" "$HERE/scripts/gpu_check.py" "$out" --budget-s "$budget" --work /tmp/gpu-check-models
}

build_there() {  # the trimmed sources, built into this machine's Python (a throwaway image)
    local py=$1 out=$2 venv
    venv=$("$py" -c 'import sys; print(sys.prefix)')
    rm -rf /tmp/llama-src && xz -dc "$CARRY/llama-src.tar.xz" | tar -C /tmp -xf -
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) bash "$HERE/scripts/install-cuda-backend.sh" \
        --venv "$venv" --arch 90 --sdist /tmp/llama-src --build-dir /tmp/llama-build \
        --pip-arg --no-build-isolation >"$out/build.log" 2>&1 \
        || { tail -n 40 "$out/build.log"; die "the CUDA build failed (build.log)"; }
    tail -n 3 "$out/build.log"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare --venv DIR | run [--out DIR] [--budget-s S]" >&2; exit 2 ;;
esac
