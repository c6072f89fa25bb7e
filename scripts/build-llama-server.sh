#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the sources vendored in the pinned llama-cpp-python sdist,
# so benchmarks can compare localllm with the reference server of the SAME llama.cpp.
#
#   scripts/build-llama-server.sh               # build once into the cache, print the binary's path
#   scripts/build-llama-server.sh --print-path  # just the path (the build may not exist yet)
#
# Cached under ${LOCALLLM_LLAMA_SERVER_CACHE:-~/.cache/localllm/llama-server}/<version>/; reuses the
# sources scripts/build-rpc.sh unpacked (or downloads the sdist). A CPU build with GGML_NATIVE, no
# web UI download, no OpenSSL: about 40-60 minutes on 2 busy cores, seconds once cached.
# Benchmarks run it with --no-repack where repacked CPU weights crash (see docs/benchmarks.md).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$HERE/pyproject.toml" | head -n 1)
[ -n "$VERSION" ] || { echo "build-llama-server: no llama-cpp-python pin in pyproject.toml" >&2; exit 1; }
CACHE=${LOCALLLM_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localllm/llama-server}/$VERSION
BIN=$CACHE/build/bin/llama-server

if [ "${1:-}" = "--print-path" ]; then echo "$BIN"; exit 0; fi
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

command -v cmake >/dev/null 2>&1 || { echo "build-llama-server: cmake not found" >&2; exit 1; }
# The sources: the RPC build's unpacked sdist when there is one, else download and unpack.
RPC_CACHE=$("$HERE/scripts/build-rpc.sh" --print-dir)
SRC=$RPC_CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$SRC/tools/server/server.cpp" ]; then
    mkdir -p "$CACHE/sdist" "$CACHE/src"
    "$PYTHON" -m pip download --quiet --no-cache-dir --no-deps --no-binary :all: \
        --dest "$CACHE/sdist" "llama-cpp-python==$VERSION"
    tar -xzf "$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/src"
    SRC=$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp
fi
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
echo "# building llama-server $VERSION into $CACHE (nice 19; tens of minutes on few cores)" >&2
start=$(date +%s)
cmake -S "$SRC" -B "$CACHE/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF > "$CACHE/configure.log" 2>&1 \
    || { tail -n 20 "$CACHE/configure.log" >&2; exit 1; }
nice -n 19 cmake --build "$CACHE/build" --target llama-server -j "$(nproc)" > "$CACHE/build.log" 2>&1 \
    || { tail -n 30 "$CACHE/build.log" >&2; exit 1; }
echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores in $(( $(date +%s) - start ))s" >> "$CACHE/build-times"
echo "$BIN"
