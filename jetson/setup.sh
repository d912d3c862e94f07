#!/usr/bin/env bash
# Set up a running Jetson (JetPack 6, AGX Orin) to run the edge agent as a hardened service:
# apt packages (JetPack's TensorRT Python bindings), a venv that sees them, the agent installed
# from a wheel or a source tree, the service user, the config (kept if present), the unit enabled,
# and optionally a power mode and maximum clocks. Safe to run again (an upgrade is a re-run).
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edge-agent
CONFIG=/etc/edge-agent/agent.toml
UNIT_DIR=/usr/lib/systemd/system
# Jetson Linux's release file; overridable so --dry-run can be checked off a Jetson.
TEGRA_RELEASE=${TEGRA_RELEASE:-/etc/nv_tegra_release}

usage() {
    cat <<EOF
Usage: sudo $PROG (--wheel FILE.whl | --source DIR) [options]

Installs the edge agent on this Jetson:
  apt        python3-venv, build tools, JetPack's TensorRT bindings (python3-libnvinfer)
  venv       $PREFIX/venv, created with --system-site-packages so JetPack's tensorrt is visible
  agent      edge-llm[jetson] from the wheel or source dir, into the venv
  user       edge-agent (systemd-sysusers), in the video and render groups
  config     $CONFIG (written only if missing; jetson/provision.sh writes a full one)
  unit       edge-agent.service installed and enabled (started with --now)

Options:
  --wheel FILE           install this edge_llm-*.whl
  --source DIR           install from this source tree (the repo root, with pyproject.toml)
  --python EXE           Python for the venv (default: python3.11; the agent needs >= 3.11)
  --extras LIST          pip extras to install (default: jetson; "" for none)
  --power-mode N         set the nvpmodel power mode (nvpmodel -m N; see nvpmodel -p --verbose)
  --max-clocks           pin clocks at the mode's maximum (jetson_clocks), now and at every boot
  --mosquitto-clients    also install mosquitto-clients (mosquitto_sub/pub, for checking)
  --no-apt               skip apt-get (packages already installed, or offline)
  --now                  start (or restart) the service at the end
  --dry-run              print what would be done, change nothing
  -h, --help             this help
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

note() {
    echo "==> $*"
}

DRY_RUN=0
run() { # run a command, or print it under --dry-run
    if ((DRY_RUN)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

WHEEL=""
SOURCE=""
PYTHON=python3.11
EXTRAS=jetson
POWER_MODE=""
MAX_CLOCKS=0
MOSQUITTO_CLIENTS=0
APT=1
START=0

need_value() {
    [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --wheel) need_value "$@"; WHEEL=$2; shift 2 ;;
        --source) need_value "$@"; SOURCE=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; shift 2 ;;
        --extras) need_value "$@"; EXTRAS=$2; shift 2 ;;
        --power-mode) need_value "$@"; POWER_MODE=$2; shift 2 ;;
        --max-clocks) MAX_CLOCKS=1; shift ;;
        --mosquitto-clients) MOSQUITTO_CLIENTS=1; shift ;;
        --no-apt) APT=0; shift ;;
        --now) START=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[[ -n "$WHEEL" || -n "$SOURCE" ]] || die "give the agent to install: --wheel FILE or --source DIR"
[[ -z "$WHEEL" || -z "$SOURCE" ]] || die "give --wheel or --source, not both"
if [[ -n "$WHEEL" ]]; then
    [[ -f "$WHEEL" && "$WHEEL" == *.whl ]] || die "--wheel '$WHEEL' is not a .whl file"
    TARGET=$(realpath "$WHEEL")
else
    [[ -f "$SOURCE/pyproject.toml" ]] || die "--source '$SOURCE' has no pyproject.toml"
    TARGET=$(realpath "$SOURCE")
fi
[[ -z "$POWER_MODE" || "$POWER_MODE" =~ ^[0-9]+$ ]] || die "--power-mode '$POWER_MODE' is not a number"
[[ "$EXTRAS" =~ ^[a-z0-9,_-]*$ ]] || die "--extras '$EXTRAS': comma-separated extra names"
((DRY_RUN)) || [[ $EUID -eq 0 ]] || die "run as root (sudo $PROG ...)"
for unit_file in edge-agent.service edge-agent.sysusers edge-agent.tmpfiles; do
    [[ -f "$HERE/../systemd/$unit_file" ]] || die "$HERE/../systemd/$unit_file is missing"
done

JETSON=0
if [[ -f "$TEGRA_RELEASE" ]]; then
    JETSON=1
    note "Jetson Linux $(head -n 1 "$TEGRA_RELEASE" | cut -c 3-40)"
else
    note "not a Jetson (no $TEGRA_RELEASE): skipping JetPack packages and power settings"
    [[ -z "$POWER_MODE" && $MAX_CLOCKS -eq 0 ]] || die "--power-mode/--max-clocks need a Jetson"
fi

# --- packages ----------------------------------------------------------------------------------

if ((APT)); then
    packages=(python3-venv python3-dev build-essential)
    if [[ "$PYTHON" =~ ^python3\.[0-9]+$ ]]; then
        packages+=("$PYTHON" "$PYTHON-venv" "$PYTHON-dev")
    fi
    # TensorRT's Python bindings from JetPack; pycuda (the `jetson` extra) builds against the
    # CUDA toolkit's headers.
    if ((JETSON)); then packages+=(python3-libnvinfer nvidia-cuda-dev); fi
    if ((MOSQUITTO_CLIENTS)); then packages+=(mosquitto-clients); fi
    note "apt packages: ${packages[*]}"
    run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
fi

# --- the venv and the agent ----------------------------------------------------------------------

command -v "$PYTHON" >/dev/null || ((DRY_RUN)) || die "$PYTHON not found (--python EXE)"
if ! ((DRY_RUN)); then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); the agent needs Python >= 3.11 (--python python3.11)"
fi
VENV=$PREFIX/venv
if [[ -x "$VENV/bin/python" ]] && ! ((DRY_RUN)) &&
    [[ "$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])')" != \
        "$("$PYTHON" -c 'import sys; print(sys.version_info[:2])')" ]]; then
    note "the existing venv has another Python: recreating it"
    run rm -rf "$VENV"
fi
run install -d -m 0755 "$PREFIX"
note "venv $VENV (with the system site-packages, where JetPack puts tensorrt)"
run "$PYTHON" -m venv --system-site-packages "$VENV"
run "$VENV/bin/python" -m pip install --quiet --upgrade pip
SPEC=$TARGET
[[ -z "$EXTRAS" ]] || SPEC="${TARGET}[$EXTRAS]"
note "installing $SPEC"
if ((JETSON)); then
    run env PATH="/usr/local/cuda/bin:$PATH" CUDA_ROOT=/usr/local/cuda \
        "$VENV/bin/python" -m pip install --quiet --upgrade "$SPEC"
else
    run "$VENV/bin/python" -m pip install --quiet --upgrade "$SPEC"
fi
if ((JETSON)) && ! ((DRY_RUN)) && ! "$VENV/bin/python" -c 'import tensorrt' 2>/dev/null; then
    # JetPack 6 builds python3-libnvinfer for Ubuntu 22.04's Python 3.10 only.
    note "WARNING: tensorrt cannot be imported by $("$VENV/bin/python" -V 2>&1): JetPack's" \
        "bindings are built for the system Python only; the agent will use ONNX Runtime until" \
        "bindings for this Python are installed"
fi

# --- user, directories, config, unit ---------------------------------------------------------------

note "service user edge-agent and its directories"
run install -D -m 0644 "$HERE/../systemd/edge-agent.sysusers" /usr/lib/sysusers.d/edge-agent.conf
run install -D -m 0644 "$HERE/../systemd/edge-agent.tmpfiles" /usr/lib/tmpfiles.d/edge-agent.conf
run systemd-sysusers /usr/lib/sysusers.d/edge-agent.conf
run systemd-tmpfiles --create /usr/lib/tmpfiles.d/edge-agent.conf

if [[ -e "$CONFIG" ]]; then
    note "keeping the existing $CONFIG"
else
    note "writing a starting $CONFIG (edit the broker, or use jetson/provision.sh)"
    config_tmp=$(mktemp)
    trap 'rm -f "$config_tmp"' EXIT
    cat >"$config_tmp" <<EOF
# edge-agent configuration, written by jetson/setup.sh. Every key has a default (README,
# "Running the agent"); jetson/provision.sh writes a complete one with the broker's TLS files.

[device]
id = "$(hostname -s)"

[bundle]
path = "/var/lib/edge-agent/bundles/current"

[state]
dir = "/var/lib/edge-agent"

[mqtt]
host = "localhost"
port = 1883
EOF
    run install -D -m 0640 -o root -g edge-agent "$config_tmp" "$CONFIG"
fi

note "edge-agent.service"
run install -D -m 0644 "$HERE/../systemd/edge-agent.service" "$UNIT_DIR/edge-agent.service"

# --- power ---------------------------------------------------------------------------------------

if [[ -n "$POWER_MODE" ]]; then
    note "power mode $POWER_MODE (some mode changes take effect only after a reboot)"
    # nvpmodel asks on stdin whether to reboot when a mode needs it: answer no, report it.
    run nvpmodel -m "$POWER_MODE" </dev/null
    run nvpmodel -q
fi
if ((MAX_CLOCKS)); then
    note "maximum clocks (jetson_clocks), now and at every boot"
    run jetson_clocks
    clocks_unit=$(mktemp)
    cat >"$clocks_unit" <<'EOF'
[Unit]
Description=Pin Jetson clocks at the power mode's maximum (for edge-agent)
After=nvpmodel.service
Before=edge-agent.service

[Service]
Type=oneshot
ExecStart=/usr/bin/jetson_clocks

[Install]
WantedBy=multi-user.target
EOF
    run install -D -m 0644 "$clocks_unit" /etc/systemd/system/edge-agent-max-clocks.service
    rm -f "$clocks_unit"
    run systemctl daemon-reload
    run systemctl enable edge-agent-max-clocks.service
fi

run systemctl daemon-reload
run systemctl enable edge-agent.service
if ((START)); then
    run systemctl reset-failed edge-agent.service
    run systemctl restart edge-agent.service
    note "started: journalctl -u edge-agent -f"
else
    note "enabled; start it with: systemctl start edge-agent (journalctl -u edge-agent -f)"
fi
