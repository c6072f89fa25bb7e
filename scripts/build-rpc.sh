#!/usr/bin/env bash
# Build llama.cpp's RPC pieces from the sources vendored in the llama-cpp-python sdist:
#   - a llama-cpp-python wheel built with GGML_RPC=ON (its libraries also go to lib/, so a venv
#     with the stock wheel can load them through LLAMA_CPP_LIB_PATH), and
#   - rpc-server (vendor/llama.cpp/tools/rpc), linked against those same ggml libraries, so the
#     client and the server always speak the same RPC protocol version.
#
#   scripts/build-rpc.sh                          # build once into the cache, print where
#   scripts/build-rpc.sh --install .venv          # and install the RPC wheel into a venv
#   scripts/build-rpc.sh --cmake-arg -DGGML_CUDA=on --cache DIR   # a GPU rpc-server host
#   scripts/build-rpc.sh --print-dir              # just the cache folder (for scripts and tests)
#   scripts/build-rpc.sh --serve 192.168.1.20:50052 [-- rpc-server flags]   # build, then run it
#
# Cached under ${LOCALLLM_RPC_CACHE:-~/.cache/localllm/rpc}/<version>[-<args hash>]/; a second run
# with the same version and CMake arguments returns in seconds. The build never goes through pip's
# shared wheel cache (--no-cache-dir): pip would otherwise hand back the CPU-only wheel.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VERSION=""
CACHE_ROOT=${LOCALLLM_RPC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localllm/rpc}
SDIST=""
INSTALL_VENV=""
PRINT_DIR=0
FORCE=0
SERVE=""
EXTRA_CMAKE_ARGS=()
SERVER_ARGS=()

usage() {
    cat <<EOF
usage: $0 [options]
  --version VER      llama-cpp-python version (default: the one localllm pins)
  --cache DIR        cache root (default: $CACHE_ROOT)
  --python PY        python used to run pip (default: $PYTHON)
  --sdist FILE       use this llama-cpp-python sdist instead of downloading it
  --cmake-arg ARG    one more CMake argument, e.g. -DGGML_CUDA=on (repeatable)
  --install VENV     also install the RPC-enabled wheel into this venv
  --force            rebuild even when the cache is complete
  --print-dir        print the cache folder for these options and exit
  --serve HOST:PORT  after building (or finding the cache), run rpc-server there; arguments
                     after -- go to rpc-server (e.g. -- --threads 8 --device CUDA0)
  -h, --help         this help
EOF
}

die() { echo "build-rpc: $*" >&2; exit 1; }
note() { echo "# $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --version) VERSION=$2; shift ;;
        --cache) CACHE_ROOT=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --sdist) SDIST=$(realpath "$2"); shift ;;
        --cmake-arg) EXTRA_CMAKE_ARGS+=("$2"); shift ;;
        --install) INSTALL_VENV=$2; shift ;;
        --force) FORCE=1 ;;
        --print-dir) PRINT_DIR=1 ;;
        --serve) SERVE=$2; shift ;;
        --) shift; SERVER_ARGS=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$VERSION" ]; then
    VERSION=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$HERE/pyproject.toml" | head -n 1)
fi
[ -n "$VERSION" ] || die "cannot tell which llama-cpp-python to build: pass --version VER"

CMAKE_ARGS_VALUE="-DGGML_RPC=ON${EXTRA_CMAKE_ARGS[*]:+ ${EXTRA_CMAKE_ARGS[*]}}"
# Extra CMake arguments (a CUDA build, say) get their own folder beside the plain CPU one.
TAG=$VERSION
if [ ${#EXTRA_CMAKE_ARGS[@]} -gt 0 ]; then
    TAG=$VERSION-$(printf '%s' "$CMAKE_ARGS_VALUE" | sha256sum | cut -c1-8)
fi
CACHE=$CACHE_ROOT/$TAG
if [ "$PRINT_DIR" -eq 1 ]; then echo "$CACHE"; exit 0; fi

STAMP=$CACHE/.complete
RPC_SERVER=$CACHE/bin/rpc-server
LIB=$CACHE/lib

the_wheel() {
    local wheels=("$CACHE"/wheel/llama_cpp_python-*.whl)
    [ -f "${wheels[0]}" ] || die "no wheel in $CACHE/wheel"
    echo "${wheels[0]}"
}

install_wheel() {
    [ -n "$INSTALL_VENV" ] || return 0
    local py=$INSTALL_VENV/bin/python wheel
    [ -x "$py" ] || die "$INSTALL_VENV is not a virtual environment (no $py)"
    wheel=$(the_wheel)
    note "installing $wheel into $INSTALL_VENV"
    "$py" -m pip install --quiet --no-cache-dir --no-deps --force-reinstall "$wheel"
    "$py" -c 'import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)' \
        || die "the installed llama-cpp-python reports no RPC support"
}

serve() {
    [ -n "$SERVE" ] || return 0
    local host=${SERVE%:*} port=${SERVE##*:}
    if [ -z "$host" ] || [ "$port" = "$SERVE" ]; then
        die "--serve wants HOST:PORT, e.g. 192.168.1.20:50052"
    fi
    note "RPC is unauthenticated: keep $SERVE on a trusted network"
    exec "$RPC_SERVER" --host "$host" --port "$port" ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"}
}

report() {
    echo "rpc-server:         $RPC_SERVER"
    echo "RPC-enabled libs:   $LIB  (LLAMA_CPP_LIB_PATH=$LIB)"
    echo "RPC-enabled wheel:  $(the_wheel)"
    [ -f "$CACHE/build-times" ] && sed 's/^/  /' "$CACHE/build-times"
    return 0
}

if [ "$FORCE" -eq 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$CMAKE_ARGS_VALUE" ] \
        && [ -x "$RPC_SERVER" ] && [ -f "$LIB/libllama.so" ]; then
    note "cached: llama-cpp-python $VERSION with $CMAKE_ARGS_VALUE in $CACHE"
    install_wheel
    report
    serve
    exit 0
fi

command -v cmake >/dev/null 2>&1 || die "cmake not found (apt install cmake)"
CXX=${CXX:-c++}
command -v "$CXX" >/dev/null 2>&1 || die "no C++ compiler ($CXX; apt install g++)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (pass --python PY)"

mkdir -p "$CACHE"
rm -f "$STAMP"
start=$(date +%s)

# --- The sources ------------------------------------------------------------------------------
SRC=$CACHE/src/llama_cpp_python-$VERSION
if [ ! -f "$SRC/vendor/llama.cpp/tools/rpc/rpc-server.cpp" ]; then
    if [ -z "$SDIST" ]; then
        note "downloading the llama-cpp-python $VERSION sdist"
        mkdir -p "$CACHE/sdist"
        "$PYTHON" -m pip download --quiet --no-cache-dir --no-deps --no-binary :all: \
            --dest "$CACHE/sdist" "llama-cpp-python==$VERSION"
        SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
    fi
    mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src"
    [ -f "$SRC/vendor/llama.cpp/tools/rpc/rpc-server.cpp" ] \
        || die "$SDIST has no vendor/llama.cpp/tools/rpc"
fi

# --- The wheel (libllama + ggml with the RPC backend) -----------------------------------------
# A fixed build folder inside the cache makes a rebuild after --force incremental.
note "building llama-cpp-python $VERSION with $CMAKE_ARGS_VALUE (nice 19; minutes on few cores)"
wheel_start=$(date +%s)
rm -rf "$CACHE/wheel"
CMAKE_ARGS=$CMAKE_ARGS_VALUE FORCE_CMAKE=1 \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    nice -n 19 "$PYTHON" -m pip wheel --quiet --no-cache-dir --no-deps \
    --config-settings=build-dir="$CACHE/build" --wheel-dir "$CACHE/wheel" "$SRC" \
    > "$CACHE/wheel.log" 2>&1 \
    || { tail -n 30 "$CACHE/wheel.log" >&2; die "the wheel build failed (log: $CACHE/wheel.log)"; }
wheel_s=$(( $(date +%s) - wheel_start ))
WHEEL=$(the_wheel)

rm -rf "$LIB" "$CACHE/unpacked"
"$PYTHON" -m zipfile -e "$WHEEL" "$CACHE/unpacked"
mv "$CACHE/unpacked/llama_cpp/lib" "$LIB"
rm -rf "$CACHE/unpacked"
[ -f "$LIB/libggml-rpc.so" ] || die "the wheel has no libggml-rpc.so: GGML_RPC did not take"

# --- rpc-server, against the wheel's own ggml -------------------------------------------------
# rpc-server needs only ggml (it reaches the RPC backend through the backend registry), so it is
# one file to compile; linking the wheel's libraries keeps server and client on one ggml build.
server_start=$(date +%s)
mkdir -p "$CACHE/bin"
GGML_SRC=$SRC/vendor/llama.cpp
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not the shell
nice -n 19 "$CXX" -std=c++17 -O2 -pthread -I"$GGML_SRC/ggml/include" \
    "$GGML_SRC/tools/rpc/rpc-server.cpp" -o "$RPC_SERVER" \
    -L"$LIB" -lggml -lggml-base -Wl,-rpath,'$ORIGIN/../lib'
server_s=$(( $(date +%s) - server_start ))
"$RPC_SERVER" --help >/dev/null 2>&1 || die "the built rpc-server does not run"

total_s=$(( $(date +%s) - start ))
{
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores: wheel ${wheel_s}s," \
        "rpc-server ${server_s}s, total ${total_s}s"
} >> "$CACHE/build-times"
printf '%s' "$CMAKE_ARGS_VALUE" > "$STAMP"
install_wheel
report
serve
