#!/usr/bin/env bash
# Provision one device into a Jetson Linux rootfs folder (Linux_for_Tegra/rootfs) before flashing:
# its identity and agent config, the broker's CA and its client certificate and key, the keys
# trusted to sign bundles, the service user, and the edge-agent unit, enabled (no systemctl: the
# rootfs is not running). Run it once per device, then flash; running it again with the same
# arguments changes nothing.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
SERVICE_USER=edge-agent
STATE_DIR=/var/lib/edge-agent
CONFIG_DIR=/etc/edge-agent

usage() {
    cat <<EOF
Usage: sudo $PROG ROOTFS --device-id ID --broker HOST:PORT --ca CA.pem --cert DEV.pem
                  --key DEV.key --trusted-key KEY.pub [--trusted-key KEY2.pub ...] [options]

Writes a device's identity into a Jetson Linux rootfs folder before it is flashed:
  ROOTFS$CONFIG_DIR/agent.toml              the agent's config (0640 root:$SERVICE_USER)
  ROOTFS$CONFIG_DIR/tls/ca.pem, device.pem  broker CA and client certificate (0644)
  ROOTFS$CONFIG_DIR/tls/device.key          client private key (0600 $SERVICE_USER)
  ROOTFS$CONFIG_DIR/trusted_keys/*.pub      public keys that may sign bundles (0644); exactly
                                            the --trusted-key files given
  ROOTFS/etc/passwd, group, shadow          the $SERVICE_USER system user (in video, render)
  ROOTFS/.../systemd/system/edge-agent.service, enabled for multi-user.target

Required:
  ROOTFS                 the rootfs folder, e.g. Linux_for_Tegra/rootfs
  --device-id ID         1-128 characters of A-Za-z0-9._:- (used in MQTT topics)
  --broker HOST:PORT     the site's MQTT broker (TLS), e.g. mqtt.site.local:8883
  --ca FILE              PEM CA certificate that signed the broker's (and the device's) cert
  --cert FILE            PEM client certificate of this device
  --key FILE             PEM private key of that certificate (unencrypted)
  --trusted-key FILE     PEM Ed25519 public key (edge-fleet keygen's NAME.pub); repeatable

Options:
  --prefix P             MQTT topic prefix (default: edgellm)
  --bundle DIR           also install this bundle as the first one (slot a, bundles/current)
  --telemetry-interval S seconds between telemetry messages (default: 10)
  --units DIR            where edge-agent.service/.sysusers/.tmpfiles are (default: ../systemd)
  -h, --help             this help

Needs root: the files must belong to the service user's uid as it is in ROOTFS/etc/passwd.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

note() {
    echo "$PROG: $*"
}

# --- arguments -------------------------------------------------------------------------------

ROOTFS=""
DEVICE_ID=""
BROKER=""
CA=""
CERT=""
KEY=""
TRUSTED_KEYS=()
PREFIX="edgellm"
BUNDLE=""
TELEMETRY_INTERVAL="10"
UNITS="$HERE/../systemd"

need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --device-id) need_value "$@"; DEVICE_ID=$2; shift 2 ;;
        --broker) need_value "$@"; BROKER=$2; shift 2 ;;
        --ca) need_value "$@"; CA=$2; shift 2 ;;
        --cert) need_value "$@"; CERT=$2; shift 2 ;;
        --key) need_value "$@"; KEY=$2; shift 2 ;;
        --trusted-key) need_value "$@"; TRUSTED_KEYS+=("$2"); shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --bundle) need_value "$@"; BUNDLE=$2; shift 2 ;;
        --telemetry-interval) need_value "$@"; TELEMETRY_INTERVAL=$2; shift 2 ;;
        --units) need_value "$@"; UNITS=$2; shift 2 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [[ -z "$ROOTFS" ]] || die "one ROOTFS only (got '$ROOTFS' and '$1')"
            ROOTFS=$1
            shift
            ;;
    esac
done

[[ -n "$ROOTFS" ]] || die "ROOTFS is required: the Linux_for_Tegra/rootfs folder (see --help)"
[[ -d "$ROOTFS" ]] || die "ROOTFS '$ROOTFS' does not exist or is not a directory"
ROOTFS=$(cd "$ROOTFS" && pwd -P)
[[ "$ROOTFS" != "/" ]] || die "ROOTFS is /: this writes into a rootfs folder, not this machine"
[[ -f "$ROOTFS/etc/passwd" && -f "$ROOTFS/etc/group" ]] ||
    die "ROOTFS '$ROOTFS' does not look like a Jetson Linux rootfs (no etc/passwd or etc/group)"

[[ -n "$DEVICE_ID" ]] || die "--device-id is required"
[[ "$DEVICE_ID" =~ ^[A-Za-z0-9._:-]{1,128}$ ]] ||
    die "--device-id '$DEVICE_ID': use 1-128 characters of A-Za-z0-9._:-"
[[ -n "$BROKER" ]] || die "--broker HOST:PORT is required"
BROKER_HOST=${BROKER%:*}
BROKER_PORT=${BROKER##*:}
BROKER_HOST=${BROKER_HOST#[}
BROKER_HOST=${BROKER_HOST%]}
if ! [[ "$BROKER" == *:* && -n "$BROKER_HOST" && "$BROKER_PORT" =~ ^[0-9]{1,5}$ ]] ||
    ((BROKER_PORT < 1 || BROKER_PORT > 65535)); then
    die "--broker '$BROKER' must be HOST:PORT with a port 1-65535"
fi
[[ "$BROKER_HOST" =~ ^[A-Za-z0-9._:-]+$ ]] || die "--broker host '$BROKER_HOST' is not a host name"
[[ "$PREFIX" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--prefix '$PREFIX': no spaces or MQTT wildcards"
[[ "$TELEMETRY_INTERVAL" =~ ^[0-9]+([.][0-9]+)?$ ]] ||
    die "--telemetry-interval '$TELEMETRY_INTERVAL' must be a number of seconds"
for pair in "--ca:$CA" "--cert:$CERT" "--key:$KEY"; do
    flag=${pair%%:*}
    file=${pair#*:}
    [[ -n "$file" ]] || die "$flag FILE is required"
    [[ -f "$file" && -r "$file" ]] || die "$flag '$file' does not exist or cannot be read"
    grep -q -- "-----BEGIN " "$file" || die "$flag '$file' is not a PEM file"
done
((${#TRUSTED_KEYS[@]} > 0)) ||
    die "--trusted-key KEY.pub is required (edge-fleet keygen's public key), at least one"
for file in "${TRUSTED_KEYS[@]}"; do
    [[ -f "$file" && -r "$file" ]] || die "--trusted-key '$file' does not exist or cannot be read"
    if grep -q "PRIVATE KEY" "$file"; then
        die "--trusted-key '$file' is a PRIVATE key: give the device only the public NAME.pub"
    fi
    grep -q -- "-----BEGIN PUBLIC KEY-----" "$file" ||
        die "--trusted-key '$file' is not a PEM public key (edge-fleet keygen writes NAME.pub)"
done
if [[ -n "$BUNDLE" ]]; then
    [[ -f "$BUNDLE/manifest.json" ]] || die "--bundle '$BUNDLE' has no manifest.json: not a bundle"
fi
for unit_file in edge-agent.service edge-agent.sysusers edge-agent.tmpfiles; do
    [[ -f "$UNITS/$unit_file" ]] || die "$UNITS/$unit_file is missing (--units DIR)"
done
[[ $EUID -eq 0 ]] || die "run as root (sudo): files in the rootfs must belong to its service user"

# With openssl at hand, catch the mistakes the broker would otherwise report after flashing.
if command -v openssl >/dev/null; then
    openssl x509 -noout -in "$CA" 2>/dev/null || die "--ca '$CA' is not a PEM certificate"
    openssl x509 -noout -in "$CERT" 2>/dev/null || die "--cert '$CERT' is not a PEM certificate"
    openssl pkey -noout -in "$KEY" -passin pass: 2>/dev/null ||
        die "--key '$KEY' is not an unencrypted PEM private key"
    [[ "$(openssl x509 -noout -pubkey -in "$CERT")" == "$(openssl pkey -pubout -in "$KEY")" ]] ||
        die "--key '$KEY' does not belong to --cert '$CERT'"
    openssl verify -CAfile "$CA" "$CERT" >/dev/null 2>&1 ||
        die "--cert '$CERT' is not signed by --ca '$CA'"
    for file in "${TRUSTED_KEYS[@]}"; do
        openssl pkey -pubin -noout -text -in "$file" 2>/dev/null | grep -q "ED25519" ||
            die "--trusted-key '$file' is not an Ed25519 public key"
    done
else
    note "openssl not found: certificate and key checks skipped"
fi

# --- paths inside the rootfs -----------------------------------------------------------------

# Every write goes through this: a symlink inside the rootfs that points at an absolute path
# (/etc -> /something) would otherwise make us write into the build machine itself. Always assign
# its output to a variable: a failure inside $(...) used as an argument would not stop the script.
inside() {
    local path="$ROOTFS/$1" resolved
    resolved=$(realpath -m "$path")
    [[ "$resolved" == "$ROOTFS" || "$resolved" == "$ROOTFS"/* ]] ||
        die "$1 resolves outside the rootfs ($resolved): refusing to write there"
    printf '%s\n' "$path"
}

LIB=""
for candidate in usr/lib lib; do
    unit_dir=$(inside "$candidate/systemd/system")
    if [[ -d "$unit_dir" ]]; then
        LIB=$candidate
        break
    fi
done
[[ -n "$LIB" ]] ||
    die "ROOTFS '$ROOTFS' has no usr/lib/systemd/system or lib/systemd/system: is it a rootfs?"

# --- the service user, as it will be on the device -------------------------------------------

PASSWD=$(inside etc/passwd)
GROUP=$(inside etc/group)
SHADOW=$(inside etc/shadow)
GSHADOW=$(inside etc/gshadow)

field() { # field FILE NAME N: the Nth field of NAME's line
    awk -F: -v name="$2" -v n="$3" '$1 == name { print $n; exit }' "$1"
}

free_system_id() { # the highest id in 999..100 unused as uid and gid (what systemd-sysusers picks)
    local id
    for ((id = 999; id >= 100; id--)); do
        if ! awk -F: -v id="$id" '$3 == id { found = 1 } END { exit !found }' "$PASSWD" "$GROUP"; then
            echo "$id"
            return
        fi
    done
    die "no free system uid/gid in 100-999 in $PASSWD"
}

rewrite() { # rewrite FILE AWK-PROGRAM [awk args]: edit in place, keeping the file's mode and owner
    local file=$1 tmp
    shift
    tmp=$(mktemp)
    awk "$@" "$file" >"$tmp"
    cat "$tmp" >"$file"
    rm -f "$tmp"
}

add_member() { # add_member GROUP: make the service user a member, creating the group if needed
    local group=$1 gid
    if [[ -z "$(field "$GROUP" "$group" 1)" ]]; then
        gid=$(free_system_id)
        echo "$group:x:$gid:" >>"$GROUP"
        if [[ -f "$GSHADOW" ]]; then echo "$group:!*::" >>"$GSHADOW"; fi
        note "created group $group ($gid) in the rootfs"
    fi
    # shellcheck disable=SC2016  # an awk program: its $4 is awk's, not the shell's
    local program='BEGIN { OFS = FS = ":" }
        $1 == group { n = split($4, m, ","); found = 0
                      for (i = 1; i <= n; i++) if (m[i] == user) found = 1
                      if (!found) $4 = ($4 == "" ? user : $4 "," user) }
        { print }'
    rewrite "$GROUP" -v group="$group" -v user="$SERVICE_USER" "$program"
    if [[ -f "$GSHADOW" ]] && [[ -n "$(field "$GSHADOW" "$group" 1)" ]]; then
        rewrite "$GSHADOW" -v group="$group" -v user="$SERVICE_USER" "$program"
    fi
}

SERVICE_UID=$(field "$PASSWD" "$SERVICE_USER" 3)
if [[ -z "$SERVICE_UID" ]]; then
    SERVICE_UID=$(free_system_id)
    if [[ -z "$(field "$GROUP" "$SERVICE_USER" 1)" ]]; then
        echo "$SERVICE_USER:x:$SERVICE_UID:" >>"$GROUP"
        if [[ -f "$GSHADOW" ]]; then echo "$SERVICE_USER:!*::" >>"$GSHADOW"; fi
    fi
    gid=$(field "$GROUP" "$SERVICE_USER" 3)
    echo "$SERVICE_USER:x:$SERVICE_UID:$gid:Edge LLM agent:$STATE_DIR:/usr/sbin/nologin" >>"$PASSWD"
    if [[ -f "$SHADOW" ]]; then echo "$SERVICE_USER:!*:::::::" >>"$SHADOW"; fi
    note "created user $SERVICE_USER ($SERVICE_UID) in the rootfs"
fi
SERVICE_GID=$(field "$PASSWD" "$SERVICE_USER" 4)
add_member video
add_member render

# --- files -----------------------------------------------------------------------------------

put() { # put MODE OWNER GROUP SOURCE DEST: copy a file into the rootfs with exact permissions
    local mode=$1 owner=$2 group=$3 source=$4 dest
    dest=$(inside "$5")
    install -D -m "$mode" -o "$owner" -g "$group" "$source" "$dest"
}

directory() { # directory MODE OWNER GROUP PATH
    local path
    path=$(inside "$4")
    install -d -m "$1" -o "$2" -g "$3" "$path"
}

directory 0755 0 0 "etc/systemd/system/multi-user.target.wants"
directory 0750 0 "$SERVICE_GID" "${CONFIG_DIR#/}"
directory 0750 0 "$SERVICE_GID" "${CONFIG_DIR#/}/tls"
directory 0755 0 0 "${CONFIG_DIR#/}/trusted_keys"
directory 0750 "$SERVICE_UID" "$SERVICE_GID" "${STATE_DIR#/}"

put 0644 0 0 "$CA" "${CONFIG_DIR#/}/tls/ca.pem"
put 0644 0 0 "$CERT" "${CONFIG_DIR#/}/tls/device.pem"
put 0600 "$SERVICE_UID" "$SERVICE_GID" "$KEY" "${CONFIG_DIR#/}/tls/device.key"

# The trusted keys are exactly the ones given: a key left from an earlier run is removed.
declare -A WANTED=()
for file in "${TRUSTED_KEYS[@]}"; do
    name=$(basename "$file")
    name=${name%.pub}.pub
    [[ -z "${WANTED[$name]:-}" ]] || die "two --trusted-key files are both named $name"
    WANTED[$name]=1
    put 0644 0 0 "$file" "${CONFIG_DIR#/}/trusted_keys/$name"
done
keys_dir=$(inside "${CONFIG_DIR#/}/trusted_keys")
for existing in "$keys_dir"/*; do
    [[ -e "$existing" ]] || continue
    if [[ -z "${WANTED[$(basename "$existing")]:-}" ]]; then
        rm -f -- "$existing"
        note "removed trusted key $(basename "$existing") (not given this time)"
    fi
done

CONFIG_TMP=$(mktemp)
trap 'rm -f "$CONFIG_TMP"' EXIT
cat >"$CONFIG_TMP" <<EOF
# edge-agent configuration of device $DEVICE_ID, written by jetson/provision.sh.
# Every key not set here has a default (see the README, "Running the agent").

[device]
id = "$DEVICE_ID"

[bundle]
path = "$STATE_DIR/bundles/current"

[state]
dir = "$STATE_DIR"

[mqtt]
host = "$BROKER_HOST"
port = $BROKER_PORT
prefix = "$PREFIX"
ca_file = "$CONFIG_DIR/tls/ca.pem"
cert_file = "$CONFIG_DIR/tls/device.pem"
key_file = "$CONFIG_DIR/tls/device.key"
# The only space deploy/mosquitto/acl lets a device write: other Response Topics are refused.
reply_topics = ["{prefix}/{device}/results/#"]

[ota]
trusted_keys_dir = "$CONFIG_DIR/trusted_keys"

[telemetry]
interval_s = $TELEMETRY_INTERVAL
EOF
put 0640 0 "$SERVICE_GID" "$CONFIG_TMP" "${CONFIG_DIR#/}/agent.toml"

if [[ -n "$BUNDLE" ]]; then
    bundles=$(inside "${STATE_DIR#/}/bundles")
    directory 0750 "$SERVICE_UID" "$SERVICE_GID" "${STATE_DIR#/}/bundles"
    rm -rf -- "$bundles/a"
    cp -R -- "$BUNDLE" "$bundles/a"
    chown -R "$SERVICE_UID:$SERVICE_GID" "$bundles/a"
    chmod -R u=rwX,g=rX,o= "$bundles/a"
    ln -sfn a "$bundles/current"
    chown -h "$SERVICE_UID:$SERVICE_GID" "$bundles/current"
    note "installed bundle $BUNDLE as bundles/a (current)"
fi

# --- the unit, enabled -------------------------------------------------------------------------

put 0644 0 0 "$UNITS/edge-agent.service" "$LIB/systemd/system/edge-agent.service"
put 0644 0 0 "$UNITS/edge-agent.sysusers" "$LIB/sysusers.d/edge-agent.conf"
put 0644 0 0 "$UNITS/edge-agent.tmpfiles" "$LIB/tmpfiles.d/edge-agent.conf"
# What `systemctl enable` would do; the link's target is the path as it will be on the device
# (absolute, so only the folder holding the link is checked to be inside the rootfs).
wants=$(inside etc/systemd/system/multi-user.target.wants)
ln -sfn "/$LIB/systemd/system/edge-agent.service" "$wants/edge-agent.service"

note "provisioned device $DEVICE_ID into $ROOTFS (broker $BROKER_HOST:$BROKER_PORT," \
    "user $SERVICE_USER uid $SERVICE_UID, ${#TRUSTED_KEYS[@]} trusted key(s))"
