"""`edge-fleet keygen`, `sign`, `verify`, `pack` and `serve`: a bundle made ready for an update
(signed, checked, packed) and served to the devices."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from agent.cli_support import complain
from agent.contract.bundle import SIGNATURE_FILE
from agent.errors import EXIT_BAD_INPUT, EXIT_OK
from fleet.commands.args import (
    Verbs,
    add_bundle_arg,
    add_path_arg,
    add_trusted_arg,
    add_verb,
    mb,
    parse_rate,
    positive_int,
)
from fleet.pack import pack_bundle
from fleet.serve import ServeKnobs, make_server
from fleet.signing import generate_keypair, load_trusted, sign_bundle, verify_bundle

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
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    key_id = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle} with key {key_id}: wrote {args.bundle / SIGNATURE_FILE}")
    print(f"next: edge-fleet pack {args.bundle} --out FILE.tar")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    report = verify_bundle(args.bundle, args.trusted)
    print(
        f"OK: {report.name} {report.version} is signed by trusted key {report.key_id} "
        f"({report.key_path}); all {report.files} files ({mb(report.total_bytes)}) match "
        "the manifest"
    )
    return EXIT_OK


# --- transport --------------------------------------------------------------------------------


def _pack(args: argparse.Namespace) -> int:
    trusted = load_trusted(args.trusted) if args.trusted else None
    result = pack_bundle(args.bundle, args.out, allow_unsigned=args.allow_unsigned, trusted=trusted)
    url = args.url_base.rstrip("/") + "/" + result.path.name
    common = f"--url {url} --sha256 {result.sha256} --size {result.size} --version {result.version}"
    print(f"archive  {result.path}")
    print(f"sha256   {result.sha256}  (also in {result.path.name}.sha256)")
    print(f"size     {result.size} bytes ({mb(result.size)})")
    print(f"bundle   {result.name} {result.version}")
    print(f"\nserve it:      edge-fleet serve {result.path.parent} --host 0.0.0.0")
    print(f"update one:    edge-fleet update --device DEVICE {common}")
    print(f"roll it out:   edge-fleet rollout --devices-file FLEET.txt {common}")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    knobs = ServeKnobs(args.rate, args.fail_after, args.fail_times)
    try:
        server = make_server(args.directory, args.host, args.port, knobs)
    except (OSError, NotADirectoryError) as exc:
        complain("edge-fleet: error:", f"cannot serve {args.directory}: {exc}")
        return EXIT_BAD_INPUT
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
    return EXIT_OK


# --- the verbs --------------------------------------------------------------------------------


def add_bundle_verbs(verbs: Verbs) -> None:
    keygen = add_verb(
        verbs, "keygen", _keygen,
        help="make an Ed25519 key pair for signing bundles",
        description="Write NAME.key (the private key, PEM PKCS8, mode 0600) and NAME.pub (the "
        "public key) into --out, and print the key id. Keep NAME.key on the operator's machine; "
        "install NAME.pub on every device, in the agent's ota.trusted_keys_dir (default "
        "/etc/edge-agent/trusted_keys/). Existing keys are never overwritten. Several .pub files "
        "may be trusted at once, which is how a key is rotated: install the new .pub, sign with "
        "the new key, then remove the old .pub.",
    )  # fmt: skip
    add_path_arg(keygen, "--out", "directory for the key files")
    keygen.add_argument("--name", default="fleet", help="file name stem (default: fleet)")

    sign = add_verb(
        verbs, "sign", _sign,
        help="sign a bundle's manifest (writes manifest.sig)",
        description="Check every file of BUNDLE against its manifest, then write manifest.sig: "
        "the base64 Ed25519 signature of the exact bytes of manifest.json. Since the manifest "
        "holds the sha256 of every other file, this signs the whole bundle. A bundle that does "
        "not match its manifest is refused, never signed. Exit status: 0 signed, 1 refused.",
    )  # fmt: skip
    add_bundle_arg(sign)
    add_path_arg(sign, "--key", "NAME.key from `edge-fleet keygen`")

    verify = add_verb(
        verbs, "verify", _verify,
        help="verify a bundle as a device will (signature + every file hash)",
        description="Check that manifest.sig is a signature of manifest.json by one of the "
        "trusted keys, then that every file matches the manifest: what a device does before "
        "installing an update. Exit status: 0 verified, 1 refused (unsigned, bad_signature, "
        "untrusted, tampered, ...).",
    )  # fmt: skip
    add_bundle_arg(verify)
    add_trusted_arg(
        verify, ".pub files, or directories of them (like a device's trusted_keys_dir)", True
    )

    pack = add_verb(
        verbs, "pack", _pack,
        help="pack a signed bundle into the .tar an update points at",
        description="Write an uncompressed, reproducible tar of BUNDLE (its files at the top "
        "level; the same bundle always gives the same bytes) and FILE.tar.sha256 beside it, "
        "then print the sha256, the size and the exact `edge-fleet update` and `rollout` "
        "command lines. Unsigned or changed bundles are refused.",
    )  # fmt: skip
    add_bundle_arg(pack)
    pack.add_argument("--out", type=Path, required=True, metavar="FILE.tar")
    pack.add_argument(
        "--allow-unsigned", action="store_true",
        help="pack a bundle without manifest.sig (devices with ota.require_signature refuse it)",
    )  # fmt: skip
    add_trusted_arg(pack, "also check that the signature is by one of these keys")
    pack.add_argument(
        "--url-base", default=f"http://{socket.gethostname()}:8000/",
        help="where the archive will be served, for the printed commands "
        "(default http://THIS-HOST:8000/, what `edge-fleet serve` uses)",
    )  # fmt: skip

    serve = add_verb(
        verbs, "serve", _serve,
        help="serve update archives over HTTP (with Range, for resumable downloads)",
        description="Serve the files directly inside DIR over plain HTTP, with byte ranges so "
        "devices resume a broken download. For a lab or a site network: the sha256 in the "
        "update command and the bundle signature make the download trustworthy, not the "
        "transport. Bind --host 0.0.0.0 to reach devices on other machines.",
    )  # fmt: skip
    serve.add_argument("directory", type=Path, metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--rate", type=parse_rate, metavar="BYTES_PER_S",
        help="throttle each download, e.g. 500k or 2M (testing resumable downloads)",
    )  # fmt: skip
    serve.add_argument(
        "--fail-after", type=positive_int, metavar="BYTES",
        help="TEST KNOB: drop each connection after this many body bytes",
    )  # fmt: skip
    serve.add_argument(
        "--fail-times", type=positive_int, metavar="N",
        help="TEST KNOB: with --fail-after, drop only the first N responses",
    )  # fmt: skip
