"""`edge-fleet certs`: the certificates for mutual TLS between the broker and every device and
operator (a CA, the broker's certificate, client certificates, the broker's role file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.errors import EXIT_OK
from fleet.certs import (
    IssuedFiles,
    make_ca,
    make_client,
    read_device_list,
    write_dynamic_security,
)
from fleet.certs import make_server as make_server_cert
from fleet.commands.args import Verbs, add_path_arg, add_repeatable_arg, add_verb


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
    return EXIT_OK


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


def _add_ca_arg(parser: argparse.ArgumentParser) -> None:
    add_path_arg(parser, "--ca", "the directory `certs ca` wrote")


def _add_days_arg(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--days", type=int, default=default, help=f"validity in days ({default})")


def add_certs_verb(verbs: Verbs) -> None:
    certs = add_verb(
        verbs, "certs", _certs,
        help="make a CA, the broker's certificate, and device/operator client certificates",
        description=CERTS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    kinds = certs.add_subparsers(dest="certs_verb", required=True, metavar="KIND")
    ca = kinds.add_parser(
        "ca",
        help="a new certificate authority (ca.pem, ca.key)",
        description="Write a self-signed CA (ca.pem) and its private key (ca.key, 0600) into "
        "--out. It can sign leaf certificates only. Keep ca.key on the operator's machine; "
        "ca.pem goes to the broker and to every client.",
    )
    add_path_arg(ca, "--out", "directory for ca.pem and ca.key")
    ca.add_argument("--name", default="edge-llm fleet CA", help="the CA's Common Name")
    _add_days_arg(ca, 3650)
    server = kinds.add_parser(
        "server",
        help="the broker's TLS certificate (server.pem, server.key)",
        description="Write the broker's certificate, signed by the CA in --ca. Clients check the "
        "host name or address they dial against the certificate's names: give every --host and "
        "--ip they use (repeatable).",
    )
    _add_ca_arg(server)
    add_repeatable_arg(server, "--host", "NAME", "DNS name (repeatable)")
    add_repeatable_arg(server, "--ip", "ADDRESS", "IP address (repeatable)")
    add_path_arg(server, "--out", "directory for server.pem/.key")
    _add_days_arg(server, 825)
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
        _add_ca_arg(parser)
        parser.add_argument("--id", required=True, help=f"the identity (e.g. {example})")
        add_path_arg(parser, "--out", "directory for ID.pem/.key")
        _add_days_arg(parser, 825)
    roles = kinds.add_parser(
        "roles",
        help="the broker's dynamic-security.json listing every device (see deploy/mosquitto/)",
        description="Write the configuration of Mosquitto's dynamic security plugin: every "
        "device (--device, repeatable, and/or --devices-file, one id a line) in a group whose "
        "role lets it subscribe to the fleet's jobs only through $share/edgellm/edgellm/fleet/jobs "
        "(a plain subscription is refused, SUBACK 0x87). Regenerate it and restart mosquitto "
        "whenever a device is added: a device it does not list can read every fleet job.",
    )
    add_repeatable_arg(roles, "--device", "ID", "a device id (repeatable)")
    roles.add_argument("--devices-file", type=Path, help="device ids, one a line (# comments)")
    add_path_arg(roles, "--out", "the file to write (dynamic-security.json)")
