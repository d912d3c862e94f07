"""The fleet's small PKI: a CA, the broker's server certificate, and one client certificate per
device or operator whose Common Name *is* the identity.

Mosquitto's `use_identity_as_username true` makes the certificate's CN the MQTT username, and the
ACL file's `%u` patterns then confine each device to its own topics (deploy/mosquitto/). So the CN
is security-relevant: it must be a plain topic level (no `/`, `+`, `#`), which `_check_identity`
enforces before anything is signed.

Keys are ECDSA P-256 (small, fast on a Jetson's CPU, accepted by every TLS stack Mosquitto and
paho use). Private keys are created 0600 from the first byte; nothing is ever overwritten, because
replacing the CA key by accident would orphan every certificate in the field.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import AgentError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_STEM = "server"
# The CN is at most 64 characters (RFC 5280 ub-common-name); device ids follow the job id alphabet.
_IDENTITY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")
CLOCK_SKEW = dt.timedelta(minutes=5)  # a device whose clock is a little behind still accepts it

# Every `user NAME` of the shipped ACL (deploy/mosquitto/acl): a certificate with this CN gets that
# identity's rights, so no device may be given one (tests/security/test_broker_identity.py checks
# this set against the file's `user` lines). Only `certs client` issues them.
ACL_USERS = frozenset({"operator"})
# The topic levels of the MQTT contract (shared/DESIGN.md): `fleet` is where the fleet's shared
# jobs are published (`edgellm/fleet/jobs`, readable by every device), and a device named like
# another level makes its topics read like someone else's.
TOPIC_WORDS = frozenset({"fleet", "jobs", "cancel", "results", "status", "telemetry", "ota"})
# edge-fleet's tools connect with client ids `edge-fleet-<random>`; the broker makes a device's
# client id its CN (`use_username_as_clientid`), so a device with such a CN could be kicked off by,
# or kick off, an operator's tool.
TOOL_CLIENT_ID_PREFIX = "edge-fleet"
# The broker's dynamic security plugin (deploy/mosquitto/): the group every device belongs to and
# the role that confines what it may subscribe to. Names in the generated dynamic-security.json.
DEVICES_GROUP = "edgellm-devices"
DEVICE_ROLE = "edgellm-device"

ClientKind = Literal["device", "operator"]


class CertError(AgentError):
    """A certificate could not be made; `message` says what to do instead."""


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    subject: str
    not_after: dt.datetime


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


def make_ca(out_dir: Path, *, name: str = "edge-llm fleet CA", days: int = 3650) -> IssuedFiles:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    _check_days(days)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _refuse_existing(cert_path, key_path)
    if not 1 <= len(name) <= 64:
        raise CertError("bad_name", f"CA name {name!r}: use 1-64 characters")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(out_dir, cert_path, key_path, cert, key)
    return IssuedFiles(cert_path, key_path, subject.rfc4514_string(), cert.not_valid_after_utc)


def load_ca(ca_dir: Path) -> CertificateAuthority:
    """The CA in `ca_dir` (ca.pem + ca.key), checked to be a usable CA whose key matches."""
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CertError(
                "no_ca",
                f"{path} does not exist: --ca must be the directory `edge-fleet certs ca --out "
                "DIR` wrote (it holds ca.pem and ca.key)",
            )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise CertError("bad_ca", f"{cert_path} is not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(
            "bad_ca", f"{key_path} is not an unencrypted PEM private key ({exc})"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("bad_ca", f"{key_path} holds a {type(key).__name__}, not an EC key")
    if key.public_key().public_numbers() != _ec_public(cert, cert_path).public_numbers():
        raise CertError("bad_ca", f"{key_path} is not the private key of {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertError("bad_ca", f"{cert_path} is not a CA certificate (no basicConstraints CA)")
    if cert.not_valid_after_utc <= _now():
        raise CertError(
            "bad_ca",
            f"the CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; make a new CA "
            "and reissue every certificate",
        )
    return CertificateAuthority(cert, key, cert_path)


def make_server(
    ca_dir: Path,
    out_dir: Path,
    *,
    hosts: list[str],
    ips: list[str],
    days: int = 825,
) -> IssuedFiles:
    """The broker's certificate: clients check the name they dial against its SANs."""
    _check_days(days)
    if not hosts and not ips:
        raise CertError(
            "bad_name", "give at least one --host NAME or --ip ADDRESS the clients will dial"
        )
    for host in hosts:
        if not _HOST_RE.match(host):
            raise CertError("bad_name", f"--host {host!r} is not a DNS name")
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            raise CertError("bad_name", f"--ip {ip!r} is not an IPv4 or IPv6 address") from None
    ca = load_ca(ca_dir)
    cert_path, key_path = out_dir / f"{SERVER_STEM}.pem", out_dir / f"{SERVER_STEM}.key"
    _refuse_existing(cert_path, key_path)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    san += [x509.IPAddress(a) for a in addresses]
    common_name = hosts[0] if hosts else str(addresses[0])
    return _issue(
        ca, out_dir, cert_path, key_path, common_name, days,
        ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(san),
    )  # fmt: skip


def make_client(
    ca_dir: Path, out_dir: Path, identity: str, *, kind: ClientKind, days: int = 825
) -> IssuedFiles:
    """A client certificate whose CN is `identity`: the device id, or an operator's name.

    The broker takes the CN as the username (`use_identity_as_username`), so the ACL decides what
    this identity may read and write; the CA's owner decides who gets which name."""
    _check_days(days)
    _check_identity(identity, kind)
    ca = load_ca(ca_dir)
    cert_path, key_path = out_dir / f"{identity}.pem", out_dir / f"{identity}.key"
    _refuse_existing(cert_path, key_path)
    return _issue(
        ca, out_dir, cert_path, key_path, identity, days, ExtendedKeyUsageOID.CLIENT_AUTH, None
    )


def describe(path: Path) -> str:
    """One line about a certificate file, for people checking what they hold."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return (
        f"{cert.subject.rfc4514_string()} issued by {cert.issuer.rfc4514_string()}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d}"
    )


# --- the broker's dynamic security plugin ------------------------------------------------------

# What a device may SUBSCRIBE to, decided by Mosquitto's dynamic security plugin when the client
# subscribes (the filter as sent, `$share/...` included): its job, cancel and update topics, and
# the fleet's jobs only through the fleet's shared subscription. Any other filter that would match
# `edgellm/fleet/jobs` (the plain topic, `edgellm/+/jobs`, `#`, another share group) is refused
# with SUBACK 0x87. Literal rules are checked before patterns, then higher priority first.
# Everything else (what may be published and delivered) is left to the ACL file (no rule here, and
# `defaultACLAccess` false, makes the plugin defer to it).
_DEVICE_SUBSCRIBE_RULES: tuple[tuple[str, str, bool, int], ...] = (
    ("subscribeLiteral", "$share/edgellm/edgellm/fleet/jobs", True, 10),
    ("subscribeLiteral", "edgellm/fleet/jobs", False, 10),
    ("subscribeLiteral", "edgellm/+/jobs", False, 10),
    # The ACL file confines delivery to the device's own topics (`%u`).
    ("subscribePattern", "edgellm/+/jobs", True, 5),
    ("subscribePattern", "edgellm/+/jobs/cancel", True, 5),
    ("subscribePattern", "edgellm/+/ota", True, 5),
    ("subscribePattern", "#", False, 0),
)


def dynamic_security_config(devices: list[str]) -> dict[str, Any]:
    """The dynamic security plugin's configuration (dynamic-security.json) for these devices.

    The plugin only knows the identities listed here: for any other CN it defers to the ACL file,
    which grants every subscription. So every device of the fleet must be listed."""
    if not devices:
        raise CertError(
            "bad_command", "no devices: give --device ID (repeatable) or --devices-file FILE"
        )
    seen: set[str] = set()
    for device in devices:
        _check_identity(device, "device")
        if device in seen:
            raise CertError("bad_name", f"device id {device!r} is listed twice")
        seen.add(device)
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [{"username": device, "textname": "edge-llm device"} for device in devices],
        "groups": [
            {
                "groupname": DEVICES_GROUP,
                "textname": "every device of the fleet (written by `edge-fleet certs roles`)",
                "roles": [{"rolename": DEVICE_ROLE}],
                "clients": [{"username": device} for device in devices],
            }
        ],
        "roles": [
            {
                "rolename": DEVICE_ROLE,
                "textname": "subscribe to its own topics, and to fleet jobs only shared",
                "acls": [
                    {"acltype": kind, "topic": topic, "allow": allow, "priority": priority}
                    for kind, topic, allow, priority in _DEVICE_SUBSCRIBE_RULES
                ],
            }
        ],
    }


def read_device_list(path: Path) -> list[str]:
    """Device ids from a file, one a line; `#` starts a comment (the format of rollout's
    --devices-file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CertError("io", f"cannot read --devices-file {path}: {exc}") from exc
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def write_dynamic_security(devices: list[str], out: Path) -> Path:
    """Write dynamic-security.json for `devices` to `out` (replacing it: the file is regenerated
    from the device list whenever the fleet changes)."""
    text = json.dumps(dynamic_security_config(devices), indent=2) + "\n"
    if out.is_dir():
        out = out / "dynamic-security.json"
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        partial.chmod(0o644)
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CertError("io", f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


# --- internals -------------------------------------------------------------------------------


def _issue(
    ca: CertificateAuthority,
    out_dir: Path,
    cert_path: Path,
    key_path: Path,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> IssuedFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    # Never valid beyond the CA: a chain with a longer-lived leaf fails verification anyway.
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    _write_pair(out_dir, cert_path, key_path, cert, key)
    return IssuedFiles(cert_path, key_path, subject.rfc4514_string(), cert.not_valid_after_utc)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """ECDSA keys sign (TLS handshakes; a CA also certificates and CRLs), nothing else."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _check_identity(identity: str, kind: ClientKind) -> None:
    if not _IDENTITY_RE.match(identity):
        raise CertError(
            "bad_name",
            f"{kind} id {identity!r}: use 1-64 characters of A-Za-z0-9._:- (it becomes the MQTT "
            "username and a topic level in the broker's ACL, so `/`, `+`, `#` and spaces are "
            "not allowed)",
        )
    folded = identity.lower()
    if folded == "fleet":
        raise CertError(
            "bad_name", "'fleet' is the topic level of the fleet's shared jobs, not an identity"
        )
    if folded in TOPIC_WORDS:
        raise CertError(
            "bad_name",
            f"{kind} id {identity!r} is a topic level of the MQTT contract (one of "
            f"{', '.join(sorted(TOPIC_WORDS))}); choose a name that is not",
        )
    if folded.startswith(TOOL_CLIENT_ID_PREFIX):
        raise CertError(
            "bad_name",
            f"{kind} id {identity!r}: names starting with {TOOL_CLIENT_ID_PREFIX!r} are the client "
            "ids of edge-fleet's own tools, and the broker uses a device's CN as its client id",
        )
    if kind == "device" and folded in {user.lower() for user in ACL_USERS}:
        raise CertError(
            "bad_name",
            f"device id {identity!r} is an identity the broker's ACL (deploy/mosquitto/acl) gives "
            "special rights: a device certificate with this name could send jobs and updates to "
            "every device. Give the device its own name; issue operator certificates with "
            "`edge-fleet certs client`",
        )


def _check_days(days: int) -> None:
    if not 1 <= days <= 36500:
        raise CertError("bad_argument", f"--days {days}: use 1 to 36500")


def _ec_public(cert: x509.Certificate, path: Path) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertError("bad_ca", f"{path} does not hold an EC public key")
    return public


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise CertError(
                "exists",
                f"{path} already exists; refusing to overwrite a certificate or key (choose "
                "another --out, or move the old files away first)",
            )


def _write_pair(
    out_dir: Path,
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertError("io", f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with `mode` from the start: a key is never readable by others,
    not even for the moment between create and chmod."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertError("exists", f"{path} already exists, refusing to overwrite it") from None
    except OSError as exc:
        raise CertError("io", f"cannot create {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; set exactly what we mean
        f.write(data)


def verify_issued(ca_cert_path: Path, cert_path: Path) -> None:
    """Check that `cert_path` was signed by the CA at `ca_cert_path` (raises CertError if not)."""
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertError("untrusted", f"{cert_path} was not issued by {ca_cert_path}") from exc


def _serial() -> int:
    return secrets.randbits(159) | 1  # positive, at most 20 octets, never zero (RFC 5280)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
