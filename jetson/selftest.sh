#!/usr/bin/env bash
# Check a Jetson AGX Orin end to end: ONNX bundles for the Orin at each precision (exported here
# or taken from a directory), TensorRT engines compiled on this device with `edge-build compile`,
# the golden canaries replayed on each engine, and speed (TTFT, decode tokens/s, peak RSS, from
# `edge-agent bench`) with the board's power read while the benchmark runs (tegrastats, or the
# INA3221 rails in sysfs). Prints one summary line per precision; exits non-zero if any failed.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TEGRA_RELEASE=${TEGRA_RELEASE:-/etc/nv_tegra_release}
DEVICE_MODEL=/proc/device-tree/model

usage() {
    cat <<EOF
Usage: $PROG [options]

On a Jetson (JetPack 6, TensorRT 10), for each precision P:
  export    edge-build export --model MODEL --target orin --precision P  (skipped if the
            ONNX bundle is already in --bundles, e.g. exported on a workstation)
  compile   edge-build compile ONNX_BUNDLE --out ENGINE_BUNDLE  (on this device)
  canaries  the engine bundle's golden canaries, replayed through the agent's TensorRT backend
  bench     edge-agent bench: TTFT, decode tokens/s, peak RSS; power sampled meanwhile

Options:
  --venv DIR          venv with edge-llm installed (default: $REPO/.venv, else
                      /opt/edge-agent/venv); it must import tensorrt and pycuda
  --bundles DIR       where bundles and engines go (default: ./selftest-bundles)
  --model M           model to export (default: smollm2-135m)
  --precisions LIST   space- or comma-separated (default: "fp32 fp16 int8 int4")
  --reuse-engines     keep engine bundles already in --bundles instead of recompiling
  --max-context N     passed to edge-build compile (default: its own)
  --max-batch N       passed to edge-build compile (default: its own)
  --prompt-tokens N   bench prompt length (default: 156)
  --new-tokens N      bench tokens generated (default: 128)
  --runs N            bench runs, medians reported (default: 5)
  -h, --help          this help

ONNX bundles are named orin-P and engine bundles trt-orin-P inside --bundles; the TensorRT timing
cache (tensorrt-timing.cache) stays there too, so a second run compiles much faster.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

note() {
    echo "==> $*"
}

need_value() {
    [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value (see --help)"
}

VENV=""
WORK=$PWD/selftest-bundles
MODEL=smollm2-135m
PRECISIONS="fp32 fp16 int8 int4"
REUSE_ENGINES=0
COMPILE_ARGS=()
PROMPT_TOKENS=156
NEW_TOKENS=128
RUNS=5

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --venv) need_value "$@"; VENV=$2; shift 2 ;;
        --bundles) need_value "$@"; WORK=$2; shift 2 ;;
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --precisions) need_value "$@"; PRECISIONS=${2//,/ }; shift 2 ;;
        --reuse-engines) REUSE_ENGINES=1; shift ;;
        --max-context | --max-batch) need_value "$@"; COMPILE_ARGS+=("$1" "$2"); shift 2 ;;
        --prompt-tokens) need_value "$@"; PROMPT_TOKENS=$2; shift 2 ;;
        --new-tokens) need_value "$@"; NEW_TOKENS=$2; shift 2 ;;
        --runs) need_value "$@"; RUNS=$2; shift 2 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

for number in "$PROMPT_TOKENS" "$NEW_TOKENS" "$RUNS"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "'$number' is not a positive whole number"
done
for precision in $PRECISIONS; do
    case "$precision" in
        fp32 | fp16 | int8 | int4) ;;
        *) die "unknown precision '$precision' (fp32, fp16, int8, int4)" ;;
    esac
done

# --- is this a Jetson that can compile engines? ---------------------------------------------

[[ $(uname -m) == aarch64 ]] || die "this is $(uname -m), not a Jetson: run $PROG on the Orin"
[[ -r $TEGRA_RELEASE ]] ||
    die "$TEGRA_RELEASE is missing: this is not a Jetson running Jetson Linux (JetPack)"
RELEASE_LINE=$(head -n 1 "$TEGRA_RELEASE")
if [[ $RELEASE_LINE =~ R([0-9]+)\ \(release\),\ REVISION:\ ([0-9.]+) ]]; then
    L4T="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
else
    die "cannot read the Jetson Linux release from $TEGRA_RELEASE: '$RELEASE_LINE'"
fi
[[ ${L4T%%.*} -ge 36 ]] ||
    die "Jetson Linux $L4T is JetPack 5 or older; engines need JetPack 6 (TensorRT 10)"
BOARD=unknown
if [[ -r $DEVICE_MODEL ]]; then
    BOARD=$(tr -d '\0' <"$DEVICE_MODEL")
fi
note "device: $BOARD, Jetson Linux $L4T"
if command -v nvpmodel >/dev/null 2>&1; then
    note "power mode: $(nvpmodel -q 2>/dev/null | head -n 1 || echo unknown)"
fi

if [[ -z $VENV ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then
        VENV=$REPO/.venv
    elif [[ -x /opt/edge-agent/venv/bin/python ]]; then
        VENV=/opt/edge-agent/venv
    else
        die "no venv found: pass --venv DIR (created by jetson/setup.sh or 'make setup')"
    fi
fi
PY=$VENV/bin/python
EDGE_BUILD=$VENV/bin/edge-build
EDGE_AGENT=$VENV/bin/edge-agent
for tool in "$PY" "$EDGE_BUILD" "$EDGE_AGENT"; do
    [[ -x $tool ]] || die "$tool is missing: install edge-llm[jetson] into $VENV"
done
if ! TRT_VERSION=$("$PY" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null); then
    HINT=""
    SYSTEM_PYTHON=$(python3 -V 2>&1 || true)
    VENV_PYTHON=$("$PY" -V 2>&1)
    if [[ $SYSTEM_PYTHON != "$VENV_PYTHON" ]]; then
        HINT=" JetPack's bindings are built for the system Python ($SYSTEM_PYTHON); this venv"
        HINT+=" runs $VENV_PYTHON, which needs TensorRT's Python bindings built for it."
    fi
    die "$PY cannot import tensorrt. Install JetPack's bindings" \
        "(sudo apt install python3-libnvinfer) and create the venv with" \
        "--system-site-packages.$HINT"
fi
"$PY" -c 'import pycuda.driver' 2>/dev/null ||
    die "$PY cannot import pycuda: pip install pycuda inside $VENV" \
        "(needs python3-dev and /usr/local/cuda/bin on PATH)"
note "TensorRT $TRT_VERSION, venv $VENV ($("$PY" -V 2>&1))"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SCRATCH=$(mktemp -d)
SAMPLER_PID=""
cleanup() {
    stop_power_sampler
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

# --- power while benchmarking -------------------------------------------------------------------

# The board's power rails are sampled every 0.5 s while a benchmark runs: with tegrastats when
# present (its fields read "VDD_GPU_SOC 4011mW/3900mW", current/average), else from the INA3221
# monitors in sysfs (voltage mV x current mA / 1000 = mW).
POWER_SOURCE=none
start_power_sampler() { # $1: file for the raw samples; sets SAMPLER_PID
    if command -v tegrastats >/dev/null 2>&1; then
        POWER_SOURCE=tegrastats
        # Line-buffered, so the samples are in the file when tegrastats is stopped.
        stdbuf -oL tegrastats --interval 500 >"$1" 2>/dev/null &
    elif compgen -G '/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*' >/dev/null; then
        POWER_SOURCE=ina3221
        sample_ina3221 >"$1" &
    else
        POWER_SOURCE=none
        return 0
    fi
    SAMPLER_PID=$!
}

stop_power_sampler() {
    if [[ -n $SAMPLER_PID ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=""
    fi
}

sample_ina3221() { # "RAIL milliwatts" lines until killed
    local hwmon label_file channel label volt curr
    while true; do
        for hwmon in /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*; do
            for label_file in "$hwmon"/in*_label; do
                [[ -r $label_file ]] || continue
                channel=${label_file##*/in}
                channel=${channel%_label}
                label=$(<"$label_file")
                volt=$(<"$hwmon/in${channel}_input") || continue
                curr=$(<"$hwmon/curr${channel}_input") || continue
                echo "$label $((volt * curr / 1000))"
            done
        done
        sleep 0.5
    done
}

# Each rail's average over the samples, and their sum: "N mW over the rails (RAIL avg mW, ...)".
summarise_power() {
    local raw=$1
    if [[ $POWER_SOURCE == tegrastats ]]; then
        awk '{ for (i = 1; i < NF; i++) {
                   if ($(i + 1) !~ /^[0-9]+mW\/[0-9]+mW$/) continue
                   split($(i + 1), mw, "mW")
                   print $i, mw[1]
               } }' "$raw"
    else
        cat "$raw"
    fi | awk '{ sum[$1] += $2; n[$1]++ }
              END {
                  if (length(n) == 0) { print "no samples"; exit }
                  total = 0; rails = ""
                  for (rail in sum) {
                      avg = sum[rail] / n[rail]
                      total += avg
                      rails = rails (rails == "" ? "" : ", ") sprintf("%s %.0f mW", rail, avg)
                  }
                  printf "%.0f mW over the rails (%s)\n", total, rails
              }'
}

# --- one precision --------------------------------------------------------------------------------

SUMMARY=()
FAILED=0

check_canaries() {
    "$PY" - "$1" <<'PYTHON'
import sys
from pathlib import Path

from agent.canary import check_golden
from agent.runtime import load_model

model = load_model(Path(sys.argv[1]))  # checks the target, then the TensorRT backend
try:
    problems = check_golden(model.bundle.path, model.backend, model.codec)
finally:
    model.backend.close()
for problem in problems:
    print(f"  canary: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PYTHON
}

bench_with_power() {
    local bundle=$1 result=$2 power=$3
    : >"$power"
    start_power_sampler "$power"
    local status=0
    "$EDGE_AGENT" bench --bundle "$bundle" --prompt-tokens "$PROMPT_TOKENS" \
        --new-tokens "$NEW_TOKENS" --runs "$RUNS" --json >"$result" || status=$?
    stop_power_sampler
    return "$status"
}

run_precision() {
    local precision=$1
    local onnx=$WORK/orin-$precision engine=$WORK/trt-orin-$precision
    local log=$WORK/selftest-$precision.log
    : >"$log"

    if [[ -f $onnx/manifest.json ]]; then
        note "[$precision] ONNX bundle $onnx (reused)"
    else
        note "[$precision] exporting $MODEL for the Orin (log: $log)"
        if ! "$EDGE_BUILD" export --model "$MODEL" --target orin --precision "$precision" \
            --out "$onnx" >>"$log" 2>&1; then
            SUMMARY+=("$precision  export FAILED (see $log)")
            return 1
        fi
    fi

    if ((REUSE_ENGINES)) && [[ -f $engine/manifest.json ]]; then
        note "[$precision] engine bundle $engine (reused)"
    else
        note "[$precision] compiling the engine on this device (log: $log)"
        if ! "$EDGE_BUILD" compile "$onnx" --out "$engine" --force "${COMPILE_ARGS[@]}" \
            >>"$log" 2>&1; then
            SUMMARY+=("$precision  compile FAILED (see $log)")
            return 1
        fi
    fi

    note "[$precision] replaying the golden canaries on the engine"
    local canaries=ok
    if ! check_canaries "$engine" 2>>"$log"; then
        canaries=FAILED
    fi

    note "[$precision] benchmarking ($RUNS runs, $PROMPT_TOKENS prompt + $NEW_TOKENS new tokens)"
    local result=$SCRATCH/bench-$precision.json power=$SCRATCH/power-$precision.txt
    if ! bench_with_power "$engine" "$result" "$power" 2>>"$log"; then
        SUMMARY+=("$precision  canaries $canaries, bench FAILED (see $log)")
        return 1
    fi
    local figures watts
    figures=$("$PY" - "$result" <<'PYTHON'
import json
import sys

(r,) = json.load(open(sys.argv[1]))["results"]
if "error" in r:
    sys.exit(f"bench failed: {r['error']}")
print(f"TTFT {r['ttft_ms']:.0f} ms, {r['decode_tokens_per_s']:.1f} tokens/s, "
      f"peak RSS {r['peak_rss_mb']:.0f} MB")
PYTHON
    ) || figures="figures unreadable"
    if [[ $POWER_SOURCE == none ]]; then
        watts="power not available (no tegrastats, no INA3221 in sysfs)"
    else
        watts="power ($POWER_SOURCE) $(summarise_power "$power")"
    fi
    SUMMARY+=("$precision  canaries $canaries, $figures; $watts")
    [[ $canaries == ok ]]
}

for precision in $PRECISIONS; do
    if ! run_precision "$precision"; then
        FAILED=1
    fi
done

echo
note "self-test of $BOARD (Jetson Linux $L4T, TensorRT $TRT_VERSION), model $MODEL"
for line in "${SUMMARY[@]}"; do
    echo "  $line"
done
if ((FAILED)); then
    note "FAILED: see the logs in $WORK"
    exit 1
fi
note "all precisions passed"
