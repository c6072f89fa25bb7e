#!/usr/bin/env bash
# The GPU check on a lent GPU machine, in one command (see README, "Measuring on a GPU").
#
# That machine has nvcc, Python 3.12 with numpy, psutil, nvidia-ml-py, jinja2 and NVIDIA's
# nvidia-cublas / nvidia-cuda-runtime wheels, and no network: what localllm needs beyond that
# travels in .gpu-carry/ (git-ignored), made here first:
#
#   scripts/gpu_check_device.sh prepare --venv /work/cuda-venv   # here: fills .gpu-carry/
#   scripts/gpu_check_device.sh run                              # there: about 7 minutes
#
# prepare packs llama-cpp-python's CUDA build from a venv made by
#   scripts/install-cuda-backend.sh --venv /work/cuda-venv --arch 90   (90: H100/H200)
# (its libraries find cuBLAS through $ORIGIN/../../nvidia/cu13/lib), plus the wheels of the pure
# Python packages the machine lacks. run unpacks them into /tmp, points nvidia/cu13 at the
# machine's own cuBLAS and CUDA runtime, and runs scripts/gpu_check.py into $OUT (or --out DIR).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$HERE/.gpu-carry
# localllm's imports that the GPU image lacks, at the versions localllm's venv has.
WHEELS=(gguf pydantic pydantic-core pydantic-settings annotated-types typing-inspection
    python-dotenv diskcache)

die() { echo "gpu_check_device: $*" >&2; exit 1; }

prepare() {
    local venv="" py="" site version
    while [ $# -gt 0 ]; do
        case "$1" in
            --venv) venv=$2; shift ;;
            --python) py=$2; shift ;;
            *) die "prepare: unknown option $1" ;;
        esac
        shift
    done
    [ -n "$venv" ] || die "prepare: give --venv DIR, the venv with llama-cpp-python's CUDA build"
    py=${py:-$HERE/.venv/bin/python}
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ls "$site"/llama_cpp/lib/libggml-cuda.so >/dev/null 2>&1 \
        || die "$venv has no CUDA build of llama-cpp-python (no llama_cpp/lib/libggml-cuda.so)"
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
    # The package as built; symbols the loader does not need are stripped (a third smaller).
    local stage
    stage=$(mktemp -d)
    cp -a "$site/llama_cpp" "$stage/"
    find "$stage/llama_cpp" -name '__pycache__' -prune -exec rm -rf {} +
    find "$stage/llama_cpp/lib" -name '*.so*' -type f -exec strip --strip-unneeded {} +
    tar -C "$stage" -cf - llama_cpp | xz -T0 -6 >"$CARRY/llama_cpp.tar.xz"
    rm -rf "$stage"
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
    [ -f "$CARRY/llama_cpp.tar.xz" ] || die "no .gpu-carry/llama_cpp.tar.xz: run 'prepare' first"
    local site=/tmp/localllm-site started=$SECONDS
    rm -rf "$site" && mkdir -p "$site/nvidia" "$out"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$CARRY"/wheels/*.whl
    xz -dc "$CARRY/llama_cpp.tar.xz" | tar -C "$site" -xf -
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
    ln -sfn "$cu13" "$site/nvidia/cu13"
    export PYTHONPATH=$site:$HERE PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv \
        | tee "$out/nvidia-smi.txt"
    echo "# set up in $((SECONDS - started)) s"
    # doctor on this build: the CUDA backend and the card it sees.
    "$py" -m localllm doctor >"$out/doctor.txt" 2>&1 || true
    head -n 30 "$out/doctor.txt"
    "$py" "$HERE/scripts/gpu_check.py" "$out" --budget-s "$budget" --work /tmp/gpu-check-models
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare --venv DIR | run [--out DIR] [--budget-s S]" >&2; exit 2 ;;
esac
