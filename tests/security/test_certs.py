"""`edge-fleet certs`: the files it writes, what is in the certificates, and its refusals."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.certs import CertError, load_ca, verify_issued
from fleet.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["certs", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_server_device_and_operator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    code, out, _ = run(capsys, "ca", "--out", ca)
    assert code == 0 and "ca.pem" in out and "next: edge-fleet certs server" in out
    assert mode(ca / "ca.key") == 0o600 and mode(ca / "ca.pem") == 0o644
    ca_cert = load(ca / "ca.pem")
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    code, out, _ = run(
        capsys, "server", "--ca", ca, "--host", "mqtt.site", "--host", "localhost",
        "--ip", "127.0.0.1", "--out", tmp_path / "broker",
    )  # fmt: skip
    assert code == 0
    server = load(tmp_path / "broker" / "server.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.site", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert usages(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert mode(tmp_path / "broker" / "server.key") == 0o600

    code, out, _ = run(capsys, "device", "--ca", ca, "--id", "orin-01", "--out", tmp_path / "d")
    assert code == 0 and "orin-01" in out
    device = load(tmp_path / "d" / "orin-01.pem")
    assert cn(device) == "orin-01"  # the CN is the identity: the broker's MQTT username
    assert usages(device) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert mode(tmp_path / "d" / "orin-01.key") == 0o600
    assert device.not_valid_after_utc <= ca_cert.not_valid_after_utc

    code, _, _ = run(capsys, "client", "--ca", ca, "--id", "operator", "--out", tmp_path / "op")
    assert code == 0 and cn(load(tmp_path / "op" / "operator.pem")) == "operator"
    for leaf in ("broker/server.pem", "d/orin-01.pem", "op/operator.pem"):
        verify_issued(ca / "ca.pem", tmp_path / leaf)
        assert (
            not load(tmp_path / leaf)
            .extensions.get_extension_for_class(x509.BasicConstraints)
            .value.ca
        )


def test_certificates_from_another_ca_do_not_verify(tmp_path: Path) -> None:
    assert main(["certs", "ca", "--out", str(tmp_path / "a")]) == 0
    assert main(["certs", "ca", "--out", str(tmp_path / "b")]) == 0
    args = ["certs", "device", "--ca", str(tmp_path / "b"), "--id", "x", "--out", str(tmp_path)]
    assert main(args) == 0
    with pytest.raises(CertError, match="was not issued by"):
        verify_issued(tmp_path / "a" / "ca.pem", tmp_path / "x.pem")


@pytest.mark.parametrize(
    "identity",
    ["orin/01", "orin+", "#", "a b", "", "x" * 65, "fleet", "caf\u00e9"],
)
def test_identities_that_are_not_one_topic_level_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], identity: str
) -> None:
    run(capsys, "ca", "--out", tmp_path / "ca")
    code, _, err = run(
        capsys, "device", "--ca", tmp_path / "ca", "--id", identity, "--out", tmp_path
    )
    assert code == 1 and "bad_name" in err
    assert list(tmp_path.glob("*.key")) == []


def test_nothing_is_ever_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    run(capsys, "ca", "--out", ca)
    before = (ca / "ca.key").read_bytes()
    code, _, err = run(capsys, "ca", "--out", ca)
    assert code == 1 and "already exists" in err
    assert (ca / "ca.key").read_bytes() == before
    run(capsys, "device", "--ca", ca, "--id", "orin-01", "--out", tmp_path)
    code, _, err = run(capsys, "device", "--ca", ca, "--id", "orin-01", "--out", tmp_path)
    assert code == 1 and "orin-01.pem already exists" in err


def test_clear_errors_about_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "device", "--ca", tmp_path / "nope", "--id", "a", "--out", tmp_path)
    assert code == 1 and "no_ca" in err and "edge-fleet certs ca --out" in err
    run(capsys, "ca", "--out", tmp_path / "one")
    run(capsys, "ca", "--out", tmp_path / "two")
    (tmp_path / "one" / "ca.key").unlink()
    (tmp_path / "one" / "ca.key").write_bytes((tmp_path / "two" / "ca.key").read_bytes())
    with pytest.raises(CertError, match="is not the private key of"):
        load_ca(tmp_path / "one")
    code, _, err = run(capsys, "server", "--ca", tmp_path / "two", "--out", tmp_path / "s")
    assert code == 1 and "--host" in err
    code, _, err = run(
        capsys, "server", "--ca", tmp_path / "two", "--ip", "10.0.0.300", "--out", tmp_path / "s"
    )
    assert code == 1 and "not an IPv4 or IPv6 address" in err
    code, _, err = run(capsys, "ca", "--out", tmp_path / "three", "--days", "0")
    assert code == 1 and "--days" in err


def test_help_teaches_the_whole_setup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["certs", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in (
        "certs ca --out",
        "certs server --ca",
        "certs device --ca ca --id orin-01",
        "use_identity_as_username",
        "0600",
    ):
        assert words in text, words
    with pytest.raises(SystemExit):
        main(["certs", "device", "--help"])
    assert "Common Name" in capsys.readouterr().out
