#!/usr/bin/env bash
# Rebuild llama-cpp-python with the CUDA backend, in place, in localllm's virtual environment.
#
# pip installs llama-cpp-python from its sdist built for the CPU only; `localllm doctor` says so
# and points here. This rebuilds the same version with GGML_CUDA=on (about 10-30 minutes).
#
#   sudo scripts/install-cuda-backend.sh                       # the venv of the installed localllm
#   scripts/install-cuda-backend.sh --venv .venv --arch native # only the card in this machine
#   scripts/install-cuda-backend.sh --configure-only           # just CMake-configure the CUDA build
#
#   scripts/install-cuda-backend.sh --venv .venv --arch 86,89 # RTX 3090 and 4090 only
#
# Needs a C++ compiler; a GPU only for --arch native. Without a CUDA toolkit (no nvcc),
# --cuda-wheels always takes the compiler itself from NVIDIA's PyPI wheels (nvidia-cuda-nvcc and
# its companions for CUDA --cuda-major, 13 by default), installed into the venv; scripts/dev does
# that on an NVIDIA machine without a toolkit (scripts/backend.py). A toolkit without cuBLAS (the
# pip-installed ones) is completed from NVIDIA's wheels too (nvidia-cublas and nvidia-cuda-runtime
# for nvcc's major version); the built library finds them through an $ORIGIN-relative RPATH, so
# nobody has to set LD_LIBRARY_PATH.
set -euo pipefail

# Consumer cards: Ampere (RTX 30xx, sm_86), Ada (RTX 40xx, sm_89), Blackwell (RTX 50xx, sm_120).
# CMake also embeds PTX for each, so a newer card still runs through the driver's JIT.
DEFAULT_ARCHS="86;89;120"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

VENV=""
ARCHS=$DEFAULT_ARCHS
VERSION=""
NVCC=""
CONFIGURE_ONLY=0
BUILD_DIR=""
WORK=""
NVCC_SITE=""
CUDA_VERSION=""  # not the environment's (NVIDIA's container images set one)
CUDA_ROOT=""
SDIST=""
CUBLAS_ROOT=""
CUDA_WHEELS=auto
CUDA_WHEELS_MAJOR=13
DRY_RUN=0
EXTRA_CMAKE_ARGS=()
EXTRA_PIP_ARGS=()

usage() {
    cat <<EOF
usage: $0 [options]
  --venv DIR          venv to rebuild in (default: \$VIRTUAL_ENV, else the venv of 'localllm'
                      on PATH, else /opt/localllm/.venv)
  --arch LIST|native  CUDA architectures, ',' or ';'-separated (default: $DEFAULT_ARCHS);
                      86,89 = RTX 3090/4090, 90 = H100/H200, 120 = RTX 50xx; 'native' builds
                      only for the GPUs in this machine (smaller, faster build)
  --version VER       llama-cpp-python version (default: the installed one)
  --nvcc PATH         the CUDA compiler (default: \$CUDACXX, nvcc on PATH, \$CUDA_HOME/bin/nvcc)
  --cublas-root DIR   cuBLAS outside the toolkit (include/ and lib/); its lib/ goes in the RPATH
  --cuda-wheels WHEN  take cuBLAS and the CUDA runtime from NVIDIA's PyPI wheels: auto (when
                      the toolkit has no cuBLAS; the default), always (and nvcc too when no
                      toolkit is found), or never
  --cuda-major N      the CUDA major version of the wheels' nvcc, when it comes from the wheels
                      (default: $CUDA_WHEELS_MAJOR; the driver must support it: 13 needs 580+)
  --cmake-arg ARG     one more CMake argument (repeatable)
  --pip-arg ARG       one more argument to pip install (repeatable; e.g. --no-build-isolation
                      on a machine without network, with scikit-build-core installed)
  --configure-only    download the sdist and run only CMake's configure step of the CUDA build
  --build-dir DIR     CMake's build folder: kept, so a stopped build resumes where it was
                      (default: a new temporary folder)
  --sdist FILE|DIR    build this llama-cpp-python sdist (or unpacked source) instead of PyPI's
  --dry-run           print the commands instead of running them
  -h, --help          this help
EOF
}

die() { echo "install-cuda-backend: $*" >&2; exit 1; }
note() { echo "# $*"; }
run() {
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=$2; shift ;;
        --arch) ARCHS=$2; shift ;;
        --version) VERSION=$2; shift ;;
        --nvcc) NVCC=$2; shift ;;
        --cublas-root) CUBLAS_ROOT=$2; shift ;;
        --cuda-wheels) CUDA_WHEELS=$2; shift ;;
        --cuda-major) CUDA_WHEELS_MAJOR=$2; shift ;;
        --cmake-arg) EXTRA_CMAKE_ARGS+=("$2"); shift ;;
        --pip-arg) EXTRA_PIP_ARGS+=("$2"); shift ;;
        --configure-only) CONFIGURE_ONLY=1 ;;
        --build-dir) BUILD_DIR=$2; shift ;;
        --sdist) SDIST=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$CUDA_WHEELS" in
    auto|always|never) ;;
    *) die "--cuda-wheels takes auto, always or never (not '$CUDA_WHEELS')" ;;
esac
# CMake separates architectures with ';', which a shell command line would split on: accept ','.
ARCHS=${ARCHS//,/;}

# --- The venv and the version ---------------------------------------------------------------
venv_of_localllm() {
    # The interpreter named on the console script's shebang line is the venv's python.
    local script interpreter
    script=$(command -v localllm 2>/dev/null) || return 1
    interpreter=$(head -n 1 "$script" | sed -n 's/^#!\([^ ]*python[^ ]*\).*/\1/p')
    [ -n "$interpreter" ] && [ -x "$interpreter" ] || return 1
    dirname "$(dirname "$interpreter")"
}

if [ -z "$VENV" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        VENV=$VIRTUAL_ENV
    elif found=$(venv_of_localllm); then
        VENV=$found
    elif [ -x /opt/localllm/.venv/bin/python ]; then
        VENV=/opt/localllm/.venv
    else
        die "no venv found: pass --venv DIR (the one localllm is installed in)"
    fi
fi
PY=$VENV/bin/python
[ -x "$PY" ] || die "$VENV is not a virtual environment (no $PY)"

if [ -z "$VERSION" ]; then
    VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
        2>/dev/null || true)
fi
if [ -z "$VERSION" ] && [ -f "$HERE/pyproject.toml" ]; then
    # Not installed yet: the version localllm pins.
    VERSION=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$HERE/pyproject.toml" | head -n 1)
fi
[ -n "$VERSION" ] || die "cannot tell which llama-cpp-python to build: pass --version VER"

# --- The CUDA toolkit -----------------------------------------------------------------------
if [ -z "$NVCC" ]; then
    if [ -n "${CUDACXX:-}" ]; then
        NVCC=$CUDACXX
    elif command -v nvcc >/dev/null 2>&1; then
        NVCC=$(command -v nvcc)
    else
        NVCC=${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}/bin/nvcc
    fi
fi
SITE_OF_VENV=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Where the wheels go: the venv, except for --configure-only, which leaves the venv as it is.
if [ "$CONFIGURE_ONLY" -eq 1 ]; then
    WORK=${BUILD_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/llama-cuda-configure.XXXXXX")}
fi
# --configure-only puts wheels the venv lacks in a scratch venv beside the build (pip --target
# cannot add one wheel to a tree another one made).
SCRATCH_VENV=$WORK/cuda-venv
wheel_site() {
    # A wheel already in the venv is used where it is; otherwise the install target.
    if [ "$CONFIGURE_ONLY" -eq 1 ] && ! [ -e "$SITE_OF_VENV/nvidia/$1" ]; then
        echo "$SCRATCH_VENV/lib/python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')/site-packages"
    else
        echo "$SITE_OF_VENV"
    fi
}
install_wheels() {  # SITE WHEEL...
    local site=$1
    shift
    if [ "$site" = "$SITE_OF_VENV" ]; then
        run "$PY" -m pip install --quiet "$@"
    else
        [ -x "$SCRATCH_VENV/bin/python" ] || run "$PY" -m venv "$SCRATCH_VENV"
        run "$SCRATCH_VENV/bin/python" -m pip install --quiet "$@"
    fi
}
if { ! [ -x "$NVCC" ] || ! "$NVCC" --version >/dev/null 2>&1; } && [ "$CUDA_WHEELS" = always ]; then
    # No toolkit: NVIDIA's compiler wheel. From CUDA 13 the wheels share one tree (nvidia/cu13:
    # bin/nvcc beside include/ and lib/), which is what nvcc expects of a toolkit.
    [ "$CUDA_WHEELS_MAJOR" -ge 13 ] 2>/dev/null || die "no CUDA toolkit found (nvcc: ${NVCC}), and
  NVIDIA's compiler wheels make a usable toolkit only from CUDA 13 (--cuda-major 13, which needs
  driver 580 or newer). Install the CUDA toolkit $CUDA_WHEELS_MAJOR.x, or update the driver."
    NVCC_SITE=$(wheel_site "cu$CUDA_WHEELS_MAJOR/bin/nvcc")
    note "no CUDA toolkit: taking nvcc $CUDA_WHEELS_MAJOR from NVIDIA's wheels (about 200 MB) into $NVCC_SITE"
    install_wheels "$NVCC_SITE" --no-deps "nvidia-cuda-nvcc==$CUDA_WHEELS_MAJOR.*"
    NVCC=$NVCC_SITE/nvidia/cu$CUDA_WHEELS_MAJOR/bin/nvcc
    # Its companions at nvcc's own minor version: a newer nvvm (cicc) writes PTX that this
    # nvcc's ptxas rejects ("Unsupported .version 9.5; current version is '9.0'").
    NVCC_MINOR=$CUDA_WHEELS_MAJOR.N
    if [ -x "$NVCC" ]; then
        NVCC_MINOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
    fi
    install_wheels "$NVCC_SITE" "nvidia-nvvm==$NVCC_MINOR.*" "nvidia-cuda-crt==$NVCC_MINOR.*" \
        "nvidia-cuda-runtime==$NVCC_MINOR.*" "nvidia-cuda-cccl==$CUDA_WHEELS_MAJOR.*"
    # The wheels carry only versioned libraries (libcudart.so.13): the link-time names below.
    CUDA_WHEELS=always
    if [ "$DRY_RUN" -eq 1 ] && ! [ -x "$NVCC" ]; then
        CUDA_VERSION=$CUDA_WHEELS_MAJOR.0
        CUDA_ROOT=$NVCC_SITE/nvidia/cu$CUDA_WHEELS_MAJOR
    fi
fi
if [ -n "$CUDA_VERSION" ]; then
    :  # a dry run of the wheels' nvcc: nothing installed to ask
elif ! [ -x "$NVCC" ] || ! "$NVCC" --version >/dev/null 2>&1; then
    die "no CUDA toolkit found (nvcc: ${NVCC}).
  Install the CUDA toolkit 12.8 or newer (for RTX 50xx; 11.8+ for RTX 30xx/40xx), e.g. NVIDIA's
  cuda-toolkit package (https://developer.nvidia.com/cuda-downloads) or Debian's
  nvidia-cuda-toolkit, then rerun; or point at it with --nvcc PATH / CUDACXX=PATH; or take
  nvcc from NVIDIA's PyPI wheels with --cuda-wheels always (CUDA 13: driver 580 or newer).
  The NVIDIA driver alone is not enough: it runs CUDA programs but cannot build them."
fi
if [ -z "$CUDA_VERSION" ]; then
    CUDA_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
    # nvcc may be a wrapper script; nvcc itself knows where its toolkit is.
    CUDA_ROOT=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    CUDA_ROOT=$(realpath -m "${CUDA_ROOT:-$(dirname "$(realpath "$NVCC")")/..}")
fi
if [ -n "$NVCC_SITE" ] && ! [ -e "$CUDA_ROOT/lib64" ]; then
    # nvcc links from its toolkit's lib64 (nvcc.profile); the wheels keep their libraries in lib.
    run ln -s lib "$CUDA_ROOT/lib64"
fi
note "CUDA toolkit $CUDA_VERSION at $CUDA_ROOT (nvcc: $NVCC)"

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

if [ "$ARCHS" = "native" ]; then
    if ! nvidia-smi -L >/dev/null 2>&1; then
        die "--arch native needs a working NVIDIA GPU and driver here; name the architectures"
    fi
elif ! version_ge "$CUDA_VERSION" 12.8 && [[ ";$ARCHS;" == *";120;"* ]]; then
    # sm_120 (RTX 50xx) arrived in CUDA 12.8; older toolkits reject it.
    ARCHS=$(echo "$ARCHS" | tr ';' '\n' | grep -vx 120 | paste -sd ';')
    note "CUDA $CUDA_VERSION cannot build sm_120 (RTX 50xx needs 12.8+): building for $ARCHS"
fi

# cuBLAS is a separate component (the pip-installed toolkits often lack it); ggml-cuda needs it.
find_first() {
    local pattern
    for pattern in "$@"; do
        # shellcheck disable=SC2086 # the patterns are globs on purpose
        for match in $pattern; do
            if [ -e "$match" ]; then echo "$match"; return 0; fi
        done
    done
    return 1
}

# Link-time names (libcublas.so, a driver stub) that the wheels and a GPU-less machine lack. For a
# real build they live in the venv, not in /tmp: CMake copies link directories into the RPATH, and
# a world-writable one there would let anyone plant libraries. Only unversioned names live here,
# which the loader never asks for, so at run time nothing in it is ever picked up.
if [ "$CONFIGURE_ONLY" -eq 1 ]; then
    LINK_DIR=$WORK/link
else
    LINK_DIR=$VENV/share/localllm/cuda-link
fi

CUDA_MAJOR=${CUDA_VERSION%%.*}
CMAKE_CUDA_ARGS=(
    -DGGML_CUDA=on
    "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS"
    "-DCMAKE_CUDA_COMPILER=$NVCC"
    "-DCUDAToolkit_ROOT=$CUDA_ROOT"
)
# CMake arguments that hold $ORIGIN: CMake must see a literal '\$ORIGIN' (Ninja hands link lines
# to the shell), and pip's CMAKE_ARGS is split like a shell line, hence the single quotes there.
RPATH_ARG=""
TOOLKIT_CUBLAS=$(find_first "$CUDA_ROOT/include/cublas_v2.h" \
    "$CUDA_ROOT/targets/*/include/cublas_v2.h" /usr/include/cublas_v2.h || true)

if [ -n "$CUBLAS_ROOT" ]; then
    CUBLAS_LIB=$(find_first "$CUBLAS_ROOT/lib/libcublas.so" "$CUBLAS_ROOT/lib/libcublas.so.*" \
        "$CUBLAS_ROOT/lib64/libcublas.so*") || die "no libcublas.so in $CUBLAS_ROOT/lib"
    CUBLASLT_LIB=$(find_first "$CUBLAS_ROOT/lib/libcublasLt.so" \
        "$CUBLAS_ROOT/lib/libcublasLt.so.*" "$CUBLAS_ROOT/lib64/libcublasLt.so*") \
        || die "no libcublasLt.so in $CUBLAS_ROOT/lib"
    [ -f "$CUBLAS_ROOT/include/cublas_v2.h" ] || die "no cublas_v2.h in $CUBLAS_ROOT/include"
    CMAKE_CUDA_ARGS+=(
        "-DCUDA_cublas_LIBRARY=$CUBLAS_LIB"
        "-DCUDA_cublasLt_LIBRARY=$CUBLASLT_LIB"
        "-DCMAKE_CUDA_FLAGS=-I$CUBLAS_ROOT/include"
    )
    RPATH_ARG="-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,$(dirname "$CUBLAS_LIB")"
    note "cuBLAS from $CUBLAS_ROOT (found at run time through the RPATH)"
elif [ -n "$TOOLKIT_CUBLAS" ] && [ "$CUDA_WHEELS" != always ]; then
    :  # The toolkit's own cuBLAS; CMake finds it.
elif [ "$CUDA_WHEELS" = never ]; then
    die "the CUDA toolkit at $CUDA_ROOT has no cuBLAS (cublas_v2.h), which llama.cpp's CUDA
  backend links. Install it (NVIDIA repo: libcublas-dev-${CUDA_VERSION/./-}; Debian:
  nvidia-cuda-toolkit, which includes it), give --cublas-root DIR, or let this script take it
  from NVIDIA's PyPI wheels (--cuda-wheels auto)."
else
    # NVIDIA's wheels: from CUDA 13 one package per component with everything under nvidia/cu13;
    # before, a -cuXX suffix and one folder per component (nvidia/cublas, nvidia/cuda_runtime).
    if [ "$CUDA_MAJOR" -ge 13 ]; then
        WHEELS=("nvidia-cublas==$CUDA_MAJOR.*" "nvidia-cuda-runtime==$CUDA_MAJOR.*")
    else
        WHEELS=("nvidia-cublas-cu$CUDA_MAJOR" "nvidia-cuda-runtime-cu$CUDA_MAJOR")
    fi
    if [ -e "${NVCC_SITE:-}/nvidia/cu$CUDA_MAJOR/lib/libcublas.so.$CUDA_MAJOR" ]; then
        WHEEL_SITE=$NVCC_SITE  # already there, beside the wheels' nvcc: nothing to fetch
    elif [ -e "$SITE_OF_VENV/nvidia/cu$CUDA_MAJOR/lib/libcublas.so.$CUDA_MAJOR" ]; then
        WHEEL_SITE=$SITE_OF_VENV  # already in the venv: nothing to fetch
    elif [ -n "$NVCC_SITE" ]; then
        WHEEL_SITE=$NVCC_SITE  # into the same tree as the wheels' nvcc
        install_wheels "$NVCC_SITE" --no-cache-dir "${WHEELS[@]}"
    elif [ "$CONFIGURE_ONLY" -eq 1 ]; then
        # Nothing is built: keep the venv as it is and unpack the wheels next to the build.
        WHEEL_SITE=$WORK/cuda-wheels
        run "$PY" -m pip install --quiet --no-cache-dir --no-deps --target "$WHEEL_SITE" \
            "${WHEELS[@]}"
    else
        WHEEL_SITE=$SITE_OF_VENV
        run "$PY" -m pip install --quiet --no-cache-dir "${WHEELS[@]}"
    fi
    note "cuBLAS and the CUDA runtime from NVIDIA's wheels (${WHEELS[*]}) in $WHEEL_SITE"
    if [ "$DRY_RUN" -eq 1 ]; then
        WHEEL_LIB=$WHEEL_SITE/nvidia/cu$CUDA_MAJOR/lib
        CUDART_LIB=$WHEEL_LIB/libcudart.so.$CUDA_MAJOR
        CUBLAS_LIB=$WHEEL_LIB/libcublas.so.$CUDA_MAJOR
        CUBLASLT_LIB=$WHEEL_LIB/libcublasLt.so.$CUDA_MAJOR
        CUBLAS_H=$WHEEL_SITE/nvidia/cu$CUDA_MAJOR/include/cublas_v2.h
    else
        CUBLAS_LIB=$(find_first "$WHEEL_SITE/nvidia/*/lib/libcublas.so.$CUDA_MAJOR") \
            || die "the nvidia-cublas wheel has no libcublas.so.$CUDA_MAJOR in $WHEEL_SITE/nvidia"
        CUBLASLT_LIB=$(find_first "$WHEEL_SITE/nvidia/*/lib/libcublasLt.so.$CUDA_MAJOR") \
            || die "the nvidia-cublas wheel has no libcublasLt.so.$CUDA_MAJOR"
        CUDART_LIB=$(find_first "$WHEEL_SITE/nvidia/*/lib/libcudart.so.$CUDA_MAJOR") \
            || die "the nvidia-cuda-runtime wheel has no libcudart.so.$CUDA_MAJOR"
        CUBLAS_H=$(find_first "$WHEEL_SITE/nvidia/*/include/cublas_v2.h") \
            || die "the nvidia-cublas wheel has no cublas_v2.h"
    fi
    # The wheels ship only the versioned names (libcublas.so.13) that the loader wants; the linker
    # wants the plain ones. Only cuBLAS's headers are borrowed: the wheels' CUDA runtime headers
    # may be newer than nvcc's, which must keep its own.
    run mkdir -p "$LINK_DIR/lib" "$LINK_DIR/include"
    run ln -sf "$CUBLAS_LIB" "$LINK_DIR/lib/libcublas.so"
    run ln -sf "$CUBLASLT_LIB" "$LINK_DIR/lib/libcublasLt.so"
    run ln -sf "$CUDART_LIB" "$LINK_DIR/lib/libcudart.so"
    for header in cublas_v2.h cublas_api.h cublas.h cublasLt.h; do
        run ln -sf "$(dirname "$CUBLAS_H")/$header" "$LINK_DIR/include/$header"
    done
    CMAKE_CUDA_ARGS+=(
        "-DCUDA_cublas_LIBRARY=$LINK_DIR/lib/libcublas.so"
        "-DCUDA_cublasLt_LIBRARY=$LINK_DIR/lib/libcublasLt.so"
        "-DCUDA_cudart_LIBRARY=$LINK_DIR/lib/libcudart.so"
        "-DCUDA_CUDART=$LINK_DIR/lib/libcudart.so"
        "-DCMAKE_CUDA_FLAGS=-I$LINK_DIR/include"
    )
    # llama-cpp-python installs its libraries in site-packages/llama_cpp/lib: point from there to
    # the wheels' folders, so the venv can move and the loader still finds them.
    RPATH=""
    for lib in "$CUBLAS_LIB" "$CUDART_LIB"; do
        rel=\$ORIGIN/$(realpath -m --relative-to="$WHEEL_SITE/llama_cpp/lib" "$(dirname "$lib")")
        case ":$RPATH:" in *":$rel:"*) ;; *) RPATH=${RPATH:+$RPATH:}$rel ;; esac
    done
    RPATH_ARG="-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,${RPATH//\$/\\\$}"
    note "run-time search path of the built libraries: $RPATH"
fi
[ -z "$RPATH_ARG" ] || CMAKE_CUDA_ARGS+=("$RPATH_ARG")

# The driver library: linked for CUDA's virtual memory API. Toolkits ship a stub in lib*/stubs;
# without one (no driver on a build machine, a pip toolkit), make a stub from cuda.h that carries
# the driver's name, libcuda.so.1, so the real driver is what loads at run time.
LIBCUDA=$(find_first "$CUDA_ROOT/lib64/stubs/libcuda.so" "$CUDA_ROOT/lib/stubs/libcuda.so" \
    "$CUDA_ROOT/targets/*/lib/stubs/libcuda.so" /usr/lib/*-linux-gnu/libcuda.so \
    /usr/lib64/libcuda.so /usr/lib/libcuda.so || true)
if [ -z "$LIBCUDA" ]; then
    if ! CUDA_H=$(find_first "$CUDA_ROOT/include/cuda.h" "$CUDA_ROOT/targets/*/include/cuda.h"); then
        # A dry run of the wheels' nvcc has installed nothing yet: where the wheel puts it.
        if [ "$DRY_RUN" -eq 0 ] || [ -z "$NVCC_SITE" ]; then
            die "no cuda.h in $CUDA_ROOT/include: the toolkit is incomplete"
        fi
        CUDA_H=$CUDA_ROOT/include/cuda.h
    fi
    LIBCUDA=$LINK_DIR/lib/libcuda.so
    note "no libcuda.so (driver or toolkit stub): linking against a stub made from $CUDA_H"
    STUB_CMD="echo '#include <cuda.h>' | ${CC:-cc} -E -I$(dirname "$CUDA_H") -x c - | tr -s ' \\n' ' ' | grep -oE 'CUresult cu[A-Za-z0-9_]+ ?[(]' | sed 's/^CUresult \\(cu[A-Za-z0-9_]*\\).*/int \\1(void) { return 999; }/' | sort -u | ${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o $LIBCUDA -x c -"
    echo "+ $STUB_CMD"
    if [ "$DRY_RUN" -eq 0 ]; then
        mkdir -p "$LINK_DIR/lib"
        bash -o pipefail -c "$STUB_CMD" || die "could not make a libcuda.so stub"
    fi
fi
CMAKE_CUDA_ARGS+=("-DCUDA_cuda_driver_LIBRARY=$LIBCUDA")

# --- Configure only: a quick, GPU-free check that this toolkit can build the CUDA backend ------
if [ "$CONFIGURE_ONLY" -eq 1 ]; then
    command -v cmake >/dev/null 2>&1 || die "cmake not found (apt install cmake)"
    if [ -z "$SDIST" ]; then
        SDIST_CMD=("$PY" -m pip download --no-binary :all: --no-deps
            --dest "$WORK" "llama-cpp-python==$VERSION")
        echo "+ ${SDIST_CMD[*]}"
        if [ "$DRY_RUN" -eq 0 ]; then
            mkdir -p "$WORK"
            "${SDIST_CMD[@]}" >"$WORK/download.log" 2>&1 \
                || { tail -n 20 "$WORK/download.log" >&2; die "could not download the sdist"; }
        fi
        SDIST=$WORK/llama_cpp_python-$VERSION.tar.gz
    fi
    if [ -d "$SDIST" ]; then
        SRC=$SDIST
    else
        SRC=$WORK/llama_cpp_python-$VERSION
        echo "+ tar -xzf $SDIST -C $WORK"
    fi
    CMAKE_CMD=(cmake -S "$SRC/vendor/llama.cpp" -B "$WORK/build" "${CMAKE_CUDA_ARGS[@]}"
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
        -DLLAMA_BUILD_SERVER=OFF ${EXTRA_CMAKE_ARGS[@]+"${EXTRA_CMAKE_ARGS[@]}"})
    echo "+ ${CMAKE_CMD[*]}"
    if [ "$DRY_RUN" -eq 1 ]; then exit 0; fi
    [ -d "$SDIST" ] || tar -xzf "$SDIST" -C "$WORK"
    [ -d "$SRC/vendor/llama.cpp" ] || die "$SDIST has no vendor/llama.cpp"
    if ! "${CMAKE_CMD[@]}" >"$WORK/configure.log" 2>&1; then
        tail -n 30 "$WORK/configure.log" >&2
        die "CMake could not configure the CUDA build (full log: $WORK/configure.log)"
    fi
    grep -q "Including CUDA backend" "$WORK/configure.log" \
        || die "configured, but without the CUDA backend (see $WORK/configure.log)"
    ARCHS_USED=$(sed -n 's/^-- Using CMAKE_CUDA_ARCHITECTURES=\([^ ]*\).*/\1/p' "$WORK/configure.log")
    echo "configured llama.cpp $VERSION's CUDA build in $WORK/build"
    echo "  CUDA $CUDA_VERSION, architectures ${ARCHS_USED:-$ARCHS}; log: $WORK/configure.log"
    echo "  build it with: cmake --build $WORK/build -j (or run without --configure-only)"
    exit 0
fi

# --- The full rebuild -------------------------------------------------------------------------
if [ "$DRY_RUN" -eq 0 ] && ! [ -w "$VENV/lib" ]; then
    die "cannot write to $VENV: run as its owner (for the service: sudo $0 ${*:-})"
fi
CMAKE_ARGS_VALUE="${CMAKE_CUDA_ARGS[*]}${EXTRA_CMAKE_ARGS[*]:+ ${EXTRA_CMAKE_ARGS[*]}}"
if [ -n "$RPATH_ARG" ]; then
    # pip splits CMAKE_ARGS like a shell line: quote the one argument with a backslash in it.
    CMAKE_ARGS_VALUE=${CMAKE_ARGS_VALUE/"$RPATH_ARG"/"'$RPATH_ARG'"}
fi
PACKAGE="llama-cpp-python==$VERSION"
[ -z "$SDIST" ] || PACKAGE=$SDIST
PIP_CMD=("$PY" -m pip install --no-cache-dir --force-reinstall --no-deps
    --no-binary llama-cpp-python "$PACKAGE")
# A kept build folder (and unpacked sources, which pip builds in place) make a rerun resume.
[ -z "$BUILD_DIR" ] || PIP_CMD+=(--config-settings "build-dir=$BUILD_DIR")
PIP_CMD+=(${EXTRA_PIP_ARGS[@]+"${EXTRA_PIP_ARGS[@]}"})
echo "+ CMAKE_ARGS=\"$CMAKE_ARGS_VALUE\" FORCE_CMAKE=1 CUDACXX=$NVCC ${PIP_CMD[*]}"
if [ "$DRY_RUN" -eq 1 ]; then exit 0; fi

note "building llama-cpp-python $VERSION with CUDA; this takes a while"
CMAKE_ARGS=$CMAKE_ARGS_VALUE FORCE_CMAKE=1 CUDACXX=$NVCC \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${PIP_CMD[@]}"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CUDA_LIB=$SITE/llama_cpp/lib/libggml-cuda.so
[ -f "$CUDA_LIB" ] || die "the build has no $CUDA_LIB: it was built without CUDA; see above"
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    "$PY" -c 'import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' \
        || die "the rebuilt llama-cpp-python reports no GPU offload; see the build output above"
    echo "llama-cpp-python $VERSION now offloads to the GPU."
else
    # No driver here (a build machine): it cannot load, but every other library must resolve.
    MISSING=$(ldd "$CUDA_LIB" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)
    [ -z "$MISSING" ] || die "built, but $CUDA_LIB cannot find: $MISSING"
    echo "llama-cpp-python $VERSION is built with CUDA (cuBLAS and the runtime resolve without"
    echo "LD_LIBRARY_PATH); this machine has no NVIDIA driver (libcuda.so.1) to run it."
fi
if [ "$VENV" = /opt/localllm/.venv ]; then
    echo "Restart the service: sudo systemctl restart localllm"
fi
