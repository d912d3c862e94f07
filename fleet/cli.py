"""`edge-fleet`: the operator's command line."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from agent.config import MqttConfig, validate_tls
from agent.contract.bundle import SIGNATURE_FILE
from agent.errors import AgentError, ConfigError
from fleet import __version__
from fleet.certs import (
    IssuedFiles,
    make_ca,
    make_client,
    read_device_list,
    write_dynamic_security,
)
from fleet.certs import make_server as make_server_cert
from fleet.pack import pack_bundle
from fleet.prompt import BadJob, NoAnswer, PromptJob, print_event, send_prompt
from fleet.rollout import DeviceResult, format_summary, parse_max_failures, rollout
from fleet.serve import ServeKnobs, make_server
from fleet.signing import generate_keypair, load_trusted, sign_bundle, verify_bundle
from fleet.update import OtaStatus, UpdateError, UpdateTimeout, format_status, send_update

DESCRIPTION = """\
Operate a fleet of edge agents over MQTT.

  edge-fleet prompt "What is the capital of France?" --device orin-01
  edge-fleet prompt "Summarise ..." --broker mqtt.site:1883 --max-tokens 200 --json
  edge-fleet prompt "Hello" --fleet            # any one device (shared subscription)

Over-the-air bundle updates, end to end:

  edge-fleet keygen --out ~/fleet-keys          # once; install fleet.pub on every device
  edge-fleet sign bundles/qwen2.5-3b --key ~/fleet-keys/fleet.key
  edge-fleet verify bundles/qwen2.5-3b --trusted ~/fleet-keys/fleet.pub
  edge-fleet pack bundles/qwen2.5-3b --out www/qwen2.5-3b.tar
  edge-fleet serve www --host 0.0.0.0           # or any web server with Range support
  edge-fleet update --device orin-01 --url http://HOST:8000/qwen2.5-3b.tar --sha256 H --size N \\
      --version V
  edge-fleet rollout --devices-file fleet.txt --url ... --sha256 H --size N --version V \\
      --max-failures 10%

Broker TLS with one certificate per identity (see `edge-fleet certs --help`):

  edge-fleet certs ca --out ca
  edge-fleet certs server --ca ca --host mqtt.site --out broker
  edge-fleet certs device --ca ca --id orin-01 --out certs/orin-01
"""


def _parse_broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _prompt(args: argparse.Namespace) -> int:
    broker = _broker(args)
    job = PromptJob(
        text=args.text,
        device=None if args.fleet else args.device,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        raw=args.raw,
        system=args.system,
        job_id=args.id,
    )

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
        else:
            print_event(event)

    try:
        final = send_prompt(broker, job, timeout_s=args.timeout, on_event=on_event)
    except NoAnswer as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 3
    except BadJob as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 2
    return 0 if final.get("event") == "done" else 1


# --- signing ----------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    private_path, public_path = generate_keypair(args.out, args.name)
    key = load_trusted([public_path])[0]
    print(f"private key  {private_path}  (mode 0600: keep it offline, never copy it to a device)")
    print(f"public key   {public_path}")
    print(f"key id       {key.key_id}")
    print(
        f"\nnext: install {public_path.name} on every device, in the agent's ota.trusted_keys_dir"
        "\n      (default /etc/edge-agent/trusted_keys/), then sign bundles with:"
        f"\n      edge-fleet sign BUNDLE --key {private_path}"
    )
    return 0


def _sign(args: argparse.Namespace) -> int:
    key_id = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle} with key {key_id}: wrote {args.bundle / SIGNATURE_FILE}")
    print(f"next: edge-fleet pack {args.bundle} --out FILE.tar")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify_bundle(args.bundle, args.trusted)
    print(
        f"OK: {report.name} {report.version} is signed by trusted key {report.key_id} "
        f"({report.key_path}); all {report.files} files ({_mb(report.total_bytes)}) match "
        "the manifest"
    )
    return 0


# --- transport ----------------------------------------------------------------------------------


def _pack(args: argparse.Namespace) -> int:
    trusted = load_trusted(args.trusted) if args.trusted else None
    result = pack_bundle(args.bundle, args.out, allow_unsigned=args.allow_unsigned, trusted=trusted)
    url = args.url_base.rstrip("/") + "/" + result.path.name
    common = f"--url {url} --sha256 {result.sha256} --size {result.size} --version {result.version}"
    print(f"archive  {result.path}")
    print(f"sha256   {result.sha256}  (also in {result.path.name}.sha256)")
    print(f"size     {result.size} bytes ({_mb(result.size)})")
    print(f"bundle   {result.name} {result.version}")
    print(f"\nserve it:      edge-fleet serve {result.path.parent} --host 0.0.0.0")
    print(f"update one:    edge-fleet update --device DEVICE {common}")
    print(f"roll it out:   edge-fleet rollout --devices-file FLEET.txt {common}")
    return 0


def _parse_rate(value: str) -> float:
    """`500k`, `2M`, `1048576`: bytes per second (k = 1000, M = 10^6)."""
    units = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}
    text = value.strip().removesuffix("/s").removesuffix("B")
    try:
        rate = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"expected bytes per second like 500k or 2M, got {value!r}"
        ) from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("the rate must be positive")
    return rate


def _serve(args: argparse.Namespace) -> int:
    knobs = ServeKnobs(args.rate, args.fail_after, args.fail_times)
    try:
        server = make_server(args.directory, args.host, args.port, knobs)
    except (OSError, NotADirectoryError) as exc:
        print(f"edge-fleet: error: cannot serve {args.directory}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shown_host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{shown_host}:{server.server_address[1]}/"
    print(f"serving {args.directory.resolve()} on {base} (Ctrl-C to stop)", flush=True)
    for path in sorted(args.directory.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            print(f"  {base}{path.name}", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    return 0


# --- updates ----------------------------------------------------------------------------------


def _broker(args: argparse.Namespace) -> MqttConfig:
    """The operator's MQTT settings from the shared flags (`_add_broker_args`)."""
    host, port = args.broker
    config = MqttConfig(
        host=host,
        port=port,
        prefix=args.prefix,
        session_expiry_s=0,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
    )
    try:
        validate_tls(config, names={"ca_file": "--ca", "cert_file": "--cert", "key_file": "--key"})
    except ConfigError as exc:
        raise ConfigError("bad_command", exc.message) from None
    return config


def _update(args: argparse.Namespace) -> int:
    def on_status(status: OtaStatus) -> None:
        if args.json:
            print(json.dumps(status.to_json()), flush=True)
        else:
            print(format_status(args.device, status), flush=True)

    try:
        final = send_update(
            _broker(args), args.device, args.url, args.sha256, args.size, args.version,
            args.id, timeout_s=args.timeout, on_status=on_status,
            allow_downgrade=args.allow_downgrade,
        )  # fmt: skip
    except UpdateTimeout as exc:
        print(f"edge-fleet: {exc}", file=sys.stderr)
        return 3
    except UpdateError as exc:
        if exc.code == "no_broker":
            print(f"edge-fleet: {exc}", file=sys.stderr)
            return 3
        raise
    return 0 if final.state == "active" else 1


def _read_devices(args: argparse.Namespace) -> list[str]:
    if args.devices is not None:
        return [d.strip() for d in args.devices.split(",") if d.strip()]
    try:
        text = args.devices_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UpdateError("bad_command", f"cannot read --devices-file: {exc}") from exc
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _rollout(args: argparse.Namespace) -> int:
    devices = _read_devices(args)
    last_state: dict[str, str] = {}

    def on_wave(index: int, waves: list[list[str]]) -> None:
        if not args.json:
            kind = " (canary)" if index == 0 else ""
            wave = waves[index]
            print(f"wave {index + 1}/{len(waves)}{kind}: {len(wave)} device(s): {', '.join(wave)}")

    def on_status(device: str, status: OtaStatus) -> None:
        if not args.json and last_state.get(device) != status.state:  # transitions only
            last_state[device] = status.state
            print(f"  {format_status(device, status)}", flush=True)

    def on_result(result: DeviceResult) -> None:
        if not args.json and result.state == "timeout":
            print(f"  {result.device} timeout: {result.error}", flush=True)

    try:
        summary = rollout(
            _broker(args), devices, args.url, args.sha256, args.size, args.version,
            canary=args.canary, growth=args.growth, max_failures=args.max_failures,
            per_device_timeout_s=args.timeout, update_id=args.id,
            on_wave=on_wave, on_status=on_status, on_result=on_result,
            allow_downgrade=args.allow_downgrade,
        )  # fmt: skip
    except ValueError as exc:
        print(f"edge-fleet rollout: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print()
        print(format_summary(summary))
    return 0 if summary.ok else 1


# --- certificates -------------------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    if args.certs_verb == "ca":
        issued = make_ca(args.out, name=args.name, days=args.days)
        _print_issued(issued)
        print(
            f"\nkeep {issued.key} offline (it signs every identity); give {issued.cert} to the "
            "broker (cafile) and to every device and operator (mqtt.ca_file)."
            f"\nnext: edge-fleet certs server --ca {args.out} --host BROKER-NAME --out broker"
        )
    elif args.certs_verb == "server":
        issued = make_server_cert(args.ca, args.out, hosts=args.host, ips=args.ip, days=args.days)
        _print_issued(issued)
        print(
            f"\nin mosquitto.conf: certfile {issued.cert}, keyfile {issued.key} (readable by the "
            "mosquitto user only), cafile the CA's ca.pem; see deploy/mosquitto/."
        )
    elif args.certs_verb == "roles":
        devices = list(args.device)
        if args.devices_file is not None:
            devices += read_device_list(args.devices_file)
        written = write_dynamic_security(devices, args.out)
        print(
            f"wrote {written} for {len(devices)} device(s); install it as "
            "/etc/mosquitto/edgellm/dynamic-security.json (readable by the mosquitto user) and "
            "restart mosquitto. A device missing from it is confined by the ACL file only: it "
            "could subscribe to edgellm/fleet/jobs without $share and read every fleet job."
        )
    else:
        device = args.certs_verb == "device"
        issued = make_client(
            args.ca, args.out, args.id, kind="device" if device else "operator", days=args.days
        )
        _print_issued(issued)
        if device:
            print(
                f"\nMQTT username (the CN): {args.id}; in the device's agent.toml [mqtt]: "
                f'ca_file = ".../ca.pem", cert_file = "{issued.cert.name}", '
                f'key_file = "{issued.key.name}", port = 8883'
                f"\nor provision it: jetson/provision.sh ROOTFS --device-id {args.id} "
                f"--ca {args.ca / 'ca.pem'} --cert {issued.cert} --key {issued.key} ..."
            )
        else:
            print(
                f"\nMQTT username (the CN): {args.id}; the broker's ACL gives this name the "
                "operator's rights (publish jobs and updates, read results and status). Issued "
                "by the operators' CA, it connects to the operators' listener (port 8884, "
                "deploy/mosquitto/operators.conf), where several tools may use it at once."
            )
    return 0


def _print_issued(issued: IssuedFiles) -> None:
    print(
        f"certificate  {issued.cert}  ({issued.subject}, valid until {issued.not_after:%Y-%m-%d})"
    )
    print(f"private key  {issued.key}  (mode 0600)")


CERTS_DESCRIPTION = """\
Make the certificates for mutual TLS between the broker and every device and operator.

Each client certificate's Common Name IS the identity: Mosquitto, with `use_identity_as_username
true`, takes it as the MQTT username, and the ACL (deploy/mosquitto/acl) lets a device read only
edgellm/<its id>/jobs, .../jobs/cancel, .../ota and the fleet's shared jobs, and write only its
own results, status, telemetry and ota/status. Whoever holds the CA key decides every identity:
keep ca.key offline.

  edge-fleet certs ca --out ca                               # ca/ca.pem + ca/ca.key (0600)
  edge-fleet certs server --ca ca --host mqtt.site --ip 10.0.0.5 --out broker
  edge-fleet certs device --ca ca --id orin-01 --out certs/orin-01   # orin-01.pem + .key
  edge-fleet certs client --ca ca --id operator --out certs/operator
  edge-fleet certs roles --devices-file fleet.txt --out dynamic-security.json   # the broker's

Device ids the ACL gives special rights (`operator`), topic words (`fleet`, `jobs`, ...) and
`edge-fleet*` are refused. Keys are ECDSA P-256, written 0600; existing files are never
overwritten. Exit status: 0 written, 1 refused (the message says why), 2 bad arguments.
"""


def _add_certs_verb(verbs: Any) -> None:
    certs = verbs.add_parser(
        "certs",
        help="make a CA, the broker's certificate, and device/operator client certificates",
        description=CERTS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = certs.add_subparsers(dest="certs_verb", required=True, metavar="KIND")
    ca = kinds.add_parser(
        "ca",
        help="a new certificate authority (ca.pem, ca.key)",
        description="Write a self-signed CA (ca.pem) and its private key (ca.key, 0600) into "
        "--out. It can sign leaf certificates only. Keep ca.key on the operator's machine; "
        "ca.pem goes to the broker and to every client.",
    )
    ca.add_argument("--out", type=Path, required=True, help="directory for ca.pem and ca.key")
    ca.add_argument("--name", default="edge-llm fleet CA", help="the CA's Common Name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (3650)")
    server = kinds.add_parser(
        "server",
        help="the broker's TLS certificate (server.pem, server.key)",
        description="Write the broker's certificate, signed by the CA in --ca. Clients check the "
        "host name or address they dial against the certificate's names: give every --host and "
        "--ip they use (repeatable).",
    )
    server.add_argument("--ca", type=Path, required=True, help="the directory `certs ca` wrote")
    server.add_argument(
        "--host", action="append", default=[], metavar="NAME", help="DNS name (repeatable)"
    )
    server.add_argument(
        "--ip", action="append", default=[], metavar="ADDRESS", help="IP address (repeatable)"
    )
    server.add_argument("--out", type=Path, required=True, help="directory for server.pem/.key")
    server.add_argument("--days", type=int, default=825, help="validity in days (825)")
    for verb, who, example in (
        ("device", "a device", "orin-01"),
        ("client", "an operator (or another client)", "operator"),
    ):
        parser = kinds.add_parser(
            verb,
            help=f"a client certificate for {who}; its CN is the --id",
            description=f"Write ID.pem and ID.key (0600) for {who}, signed by the CA in --ca, "
            f"with Common Name = --id (e.g. {example}). The broker takes the CN as the MQTT "
            "username, so the id must be a plain topic level: 1-64 characters of A-Za-z0-9._:-.",
        )
        parser.add_argument("--ca", type=Path, required=True, help="the directory `certs ca` wrote")
        parser.add_argument("--id", required=True, help=f"the identity (e.g. {example})")
        parser.add_argument("--out", type=Path, required=True, help="directory for ID.pem/.key")
        parser.add_argument("--days", type=int, default=825, help="validity in days (825)")
    roles = kinds.add_parser(
        "roles",
        help="the broker's dynamic-security.json listing every device (see deploy/mosquitto/)",
        description="Write the configuration of Mosquitto's dynamic security plugin: every "
        "device (--device, repeatable, and/or --devices-file, one id a line) in a group whose "
        "role lets it subscribe to the fleet's jobs only through $share/edgellm/edgellm/fleet/jobs "
        "(a plain subscription is refused, SUBACK 0x87). Regenerate it and restart mosquitto "
        "whenever a device is added: a device it does not list can read every fleet job.",
    )
    roles.add_argument(
        "--device", action="append", default=[], metavar="ID", help="a device id (repeatable)"
    )
    roles.add_argument("--devices-file", type=Path, help="device ids, one a line (# comments)")
    roles.add_argument(
        "--out", type=Path, required=True, help="the file to write (dynamic-security.json)"
    )
    certs.set_defaults(handler=_certs)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _max_failures(value: str) -> int | float:
    try:
        return parse_max_failures(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _add_broker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker", type=_parse_broker, default=("localhost", 1883), metavar="HOST:PORT",
        help="the MQTT broker the devices use (default localhost:1883)",
    )  # fmt: skip
    parser.add_argument("--prefix", default="edgellm", help="topic prefix (default edgellm)")
    tls = parser.add_argument_group(
        "TLS", "for a broker set up from deploy/mosquitto (port 8883, client certificates)"
    )
    tls.add_argument("--ca", metavar="PEM", help="trust the broker by this CA (turns TLS on)")
    tls.add_argument("--cert", metavar="PEM", help="the operator's certificate (`certs client`)")
    tls.add_argument("--key", metavar="PEM", help="the operator's private key")


def _add_update_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="where devices download the archive")
    parser.add_argument("--sha256", required=True, help="the archive's sha256 (from `pack`)")
    parser.add_argument(
        "--size", required=True, type=_positive_int, help="the archive's size in bytes"
    )
    parser.add_argument("--version", required=True, help="the bundle's manifest version")
    parser.add_argument("--id", help="update id (default: a random one)")
    parser.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let devices install a version that is not newer than the highest they ever ran "
        "(a deliberate rollback; refused as `downgrade` otherwise)",
    )
    _add_broker_args(parser)


def _add_ota_verbs(verbs: Any) -> None:
    keygen = verbs.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing bundles",
        description="Write NAME.key (the private key, PEM PKCS8, mode 0600) and NAME.pub (the "
        "public key) into --out, and print the key id. Keep NAME.key on the operator's machine; "
        "install NAME.pub on every device, in the agent's ota.trusted_keys_dir (default "
        "/etc/edge-agent/trusted_keys/). Existing keys are never overwritten. Several .pub files "
        "may be trusted at once, which is how a key is rotated: install the new .pub, sign with "
        "the new key, then remove the old .pub.",
    )
    keygen.add_argument("--out", type=Path, required=True, help="directory for the key files")
    keygen.add_argument("--name", default="fleet", help="file name stem (default: fleet)")
    keygen.set_defaults(handler=_keygen)

    sign = verbs.add_parser(
        "sign",
        help="sign a bundle's manifest (writes manifest.sig)",
        description="Check every file of BUNDLE against its manifest, then write manifest.sig: "
        "the base64 Ed25519 signature of the exact bytes of manifest.json. Since the manifest "
        "holds the sha256 of every other file, this signs the whole bundle. A bundle that does "
        "not match its manifest is refused, never signed. Exit status: 0 signed, 1 refused.",
    )
    sign.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    sign.add_argument("--key", type=Path, required=True, help="NAME.key from `edge-fleet keygen`")
    sign.set_defaults(handler=_sign)

    verify = verbs.add_parser(
        "verify",
        help="verify a bundle as a device will (signature + every file hash)",
        description="Check that manifest.sig is a signature of manifest.json by one of the "
        "trusted keys, then that every file matches the manifest: what a device does before "
        "installing an update. Exit status: 0 verified, 1 refused (unsigned, bad_signature, "
        "untrusted, tampered, ...).",
    )
    verify.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    verify.add_argument(
        "--trusted", type=Path, nargs="+", required=True, metavar="DIR_OR_PUB",
        help=".pub files, or directories of them (like a device's trusted_keys_dir)",
    )  # fmt: skip
    verify.set_defaults(handler=_verify)

    pack = verbs.add_parser(
        "pack",
        help="pack a signed bundle into the .tar an update points at",
        description="Write an uncompressed, reproducible tar of BUNDLE (its files at the top "
        "level; the same bundle always gives the same bytes) and FILE.tar.sha256 beside it, "
        "then print the sha256, the size and the exact `edge-fleet update` and `rollout` "
        "command lines. Unsigned or changed bundles are refused.",
    )
    pack.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    pack.add_argument("--out", type=Path, required=True, metavar="FILE.tar")
    pack.add_argument(
        "--allow-unsigned", action="store_true",
        help="pack a bundle without manifest.sig (devices with ota.require_signature refuse it)",
    )  # fmt: skip
    pack.add_argument(
        "--trusted", type=Path, nargs="+", metavar="DIR_OR_PUB",
        help="also check that the signature is by one of these keys",
    )  # fmt: skip
    pack.add_argument(
        "--url-base", default=f"http://{socket.gethostname()}:8000/",
        help="where the archive will be served, for the printed commands "
        "(default http://THIS-HOST:8000/, what `edge-fleet serve` uses)",
    )  # fmt: skip
    pack.set_defaults(handler=_pack)

    serve = verbs.add_parser(
        "serve",
        help="serve update archives over HTTP (with Range, for resumable downloads)",
        description="Serve the files directly inside DIR over plain HTTP, with byte ranges so "
        "devices resume a broken download. For a lab or a site network: the sha256 in the "
        "update command and the bundle signature make the download trustworthy, not the "
        "transport. Bind --host 0.0.0.0 to reach devices on other machines.",
    )
    serve.add_argument("directory", type=Path, metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--rate", type=_parse_rate, metavar="BYTES_PER_S",
        help="throttle each download, e.g. 500k or 2M (testing resumable downloads)",
    )  # fmt: skip
    serve.add_argument(
        "--fail-after", type=_positive_int, metavar="BYTES",
        help="TEST KNOB: drop each connection after this many body bytes",
    )  # fmt: skip
    serve.add_argument(
        "--fail-times", type=_positive_int, metavar="N",
        help="TEST KNOB: with --fail-after, drop only the first N responses",
    )  # fmt: skip
    serve.set_defaults(handler=_serve)

    update = verbs.add_parser(
        "update",
        help="update one device and follow its progress",
        description="Publish the update command to P/DEVICE/ota and print each state the "
        "device reports on P/DEVICE/ota/status (downloading, verifying, testing) until it is "
        "final: active (the new bundle serves), rolled_back or failed (the old bundle still "
        "serves). Take --url, --sha256, --size and --version from `edge-fleet pack`. Exit "
        "status: 0 active, 1 failed or rolled back, 3 no final state in time (or no broker).",
    )
    update.add_argument("--device", required=True, help="device id")
    _add_update_args(update)
    update.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the end (1800)"
    )
    update.add_argument("--json", action="store_true", help="print each status as a JSON line")
    update.set_defaults(handler=_update)

    rollout_verb = verbs.add_parser(
        "rollout",
        help="update many devices in growing waves, halting on failures",
        description="Update a canary wave first (--canary devices), then waves growing by "
        "--growth (1, 2, 4, 8, ... by default), each in parallel and followed to the end. After "
        "each wave, if the failures (failed, rolled_back, timeout) exceed --max-failures, no "
        "further wave starts and the remaining devices are reported skipped. Prints each wave, "
        "state changes, and a summary table. Exit status: 0 every device active, 1 halted or "
        "any failure, 2 bad arguments.",
    )
    devices = rollout_verb.add_mutually_exclusive_group(required=True)
    devices.add_argument("--devices", help="comma-separated device ids, in rollout order")
    devices.add_argument(
        "--devices-file", type=Path, metavar="FILE",
        help="one device id per line, in rollout order (# comments allowed)",
    )  # fmt: skip
    _add_update_args(rollout_verb)
    rollout_verb.add_argument(
        "--canary", type=_positive_int, default=1, help="devices in the first wave (1)"
    )
    rollout_verb.add_argument(
        "--growth", type=float, default=2.0, help="each wave is this many times the last (2)"
    )
    rollout_verb.add_argument(
        "--max-failures", type=_max_failures, default=0, metavar="N|P%",
        help="failures tolerated before halting: a count, or a percentage of the devices "
        "attempted (default 0: the first failure halts)",
    )  # fmt: skip
    rollout_verb.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per device (1800)"
    )
    rollout_verb.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    rollout_verb.set_defaults(handler=_rollout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-fleet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    prompt = verbs.add_parser(
        "prompt",
        help="send one prompt and print the streamed answer",
        description="Send one job and print the answer as it streams, then its figures (TTFT, "
        "tokens/s). Exit status: 0 answered, 1 refused by the device, 3 no answer in time.",
    )
    prompt.add_argument("text", help="the user message (or the raw prompt with --raw)")
    target = prompt.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="device id")
    target.add_argument("--fleet", action="store_true", help="any one device of the fleet")
    _add_broker_args(prompt)
    prompt.add_argument("--max-tokens", type=int, default=256)
    prompt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    prompt.add_argument("--system", help="a system message to send first")
    prompt.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    prompt.add_argument("--id", help="job id (default: a random one)")
    prompt.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    prompt.add_argument("--json", action="store_true", help="print each event as a JSON line")
    prompt.set_defaults(handler=_prompt)
    _add_ota_verbs(verbs)
    _add_certs_verb(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except AgentError as exc:  # every refusal has a code and says what to do
        print(f"edge-fleet {args.verb}: error {exc}", file=sys.stderr)
        return 2 if exc.code == "bad_command" else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
