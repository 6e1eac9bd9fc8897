"""TLS material for a real deployment: a CA, the SuperLink's certificate, SuperNode keys.

`write_tls_material` writes them; the server operator runs it as `dpfl certs`
(`simulations.cli.certs`). `dpfl certs OUT_DIR --host superlink.example.org --host 203.0.113.7
--supernodes 2` writes:

| file | who needs it |
| --- | --- |
| `ca.crt` | every machine: SuperNodes and `flwr` verify the SuperLink with it |
| `ca.key` | nobody at run time: keep it offline, it signs SuperLink certificates |
| `superlink.crt`, `superlink.key` | the SuperLink (`--ssl-certfile`, `--ssl-keyfile`) |
| `supernode-<i>.key` | SuperNode i only (`flower-supernode --auth-supernode-private-key`) |
| `supernode-<i>.pub` | the SuperLink operator (`flwr supernode register supernode-<i>.pub`) |

Without `--host` only SuperNode key pairs are written, so a client machine can make its
own and hand over just the `.pub` file. Private keys are written with mode 0600, and
nothing that already exists is overwritten.

Formats are the ones Flower 1.41 reads: certificates and TLS keys in PEM; SuperNode keys
are ECDSA P-384 in OpenSSH format (`flower-supernode` loads the private key with
`load_ssh_private_key`, `flwr supernode register` the public key with
`load_ssh_public_key` and accepts only NIST curves).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import DpflError
from common.storage import atomic_write

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.crt"
SUPERLINK_KEY = "superlink.key"
#: Always in the SuperLink's certificate: its own SuperExec dials the Runtime API on the
#: loopback address (Flower rewrites a 0.0.0.0 bind address to 127.0.0.1).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

_CURVE = ec.SECP384R1
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A host name of labels, at most 253 characters, optionally a leading wildcard (*.example.org).
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?{_LABEL}(\.{_LABEL})*$")


def supernode_key_names(index: int) -> tuple[str, str]:
    """File names of SuperNode `index`'s private and public key."""
    return f"supernode-{index}.key", f"supernode-{index}.pub"


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, data)  # a mkstemp file: mode 0600 from the start
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write(path, data)
    os.chmod(path, 0o644)


def parse_host(host: str) -> x509.GeneralName:
    """A SubjectAltName entry for a host name or an IP address (no scheme, no port)."""
    text = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _DNS_NAME.match(text):
        raise DpflError(
            f"--host {host!r} is invalid: must be a DNS name (superlink.example.org) or an IP "
            "address (203.0.113.7), without scheme or port"
        )
    return x509.DNSName(text.lower())


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The given hosts plus the loopback names, without duplicates, in order."""
    names: list[x509.GeneralName] = []
    for host in (*hosts, *LOOPBACK_HOSTS):
        name = parse_host(host)
        if name not in names:
            names.append(name)
    return names


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    """A certificate valid from five minutes ago (clock skew) for `days` days."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def create_ca(common_name: str = "dpfl federation CA", days: int = 3650) -> CertificateAuthority:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertificateAuthority(key, cert)


def issue_server_certificate(
    ca: CertificateAuthority, hosts: Sequence[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server key and certificate for the SuperLink, valid for `hosts` and loopback."""
    names = subject_alt_names(hosts)
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
    cert = (
        _builder(subject, ca.cert.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA384())
    )
    return key, cert


def supernode_key_pair() -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair as (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def planned_files(out_dir: Path, hosts: Sequence[str], supernodes: int) -> list[Path]:
    """Every file `write_tls_material` would write."""
    names = [CA_CERT, CA_KEY, SUPERLINK_CERT, SUPERLINK_KEY] if hosts else []
    for index in range(supernodes):
        names.extend(supernode_key_names(index))
    return [out_dir / name for name in names]


def write_tls_material(
    out_dir: Path | str, hosts: Sequence[str] = (), supernodes: int = 0, days: int = 825
) -> list[Path]:
    """Write a CA and SuperLink certificate (if `hosts`) and `supernodes` key pairs.

    Refuses to overwrite anything: a regenerated CA or key silently locks every machine
    that still holds the old one out of the federation.
    """
    out = Path(out_dir).expanduser()
    if supernodes < 0:
        raise DpflError(f"--supernodes = {supernodes} is invalid: must be an integer >= 0")
    if days < 1:
        raise DpflError(f"--days = {days} is invalid: must be an integer >= 1")
    if not hosts and not supernodes:
        raise DpflError(
            "nothing to create: give --host for the SuperLink certificate and/or "
            "--supernodes N for SuperNode key pairs"
        )
    for host in hosts:
        parse_host(host)  # fail before anything is written
    existing = [path for path in planned_files(out, hosts, supernodes) if path.exists()]
    if existing:
        raise DpflError(
            f"{existing[0]} already exists; refusing to overwrite TLS material "
            "(use a new directory, or delete the old files on purpose)"
        )
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    if hosts:
        ca = create_ca(days=max(days, 3650))
        key, cert = issue_server_certificate(ca, hosts, days=days)
        _write_private(out / CA_KEY, _private_pem(ca.key))
        _write_public(out / CA_CERT, ca.cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / SUPERLINK_KEY, _private_pem(key))
        _write_public(out / SUPERLINK_CERT, cert.public_bytes(serialization.Encoding.PEM))
        written += [out / CA_CERT, out / CA_KEY, out / SUPERLINK_CERT, out / SUPERLINK_KEY]
    for index in range(supernodes):
        private_name, public_name = supernode_key_names(index)
        private, public = supernode_key_pair()
        _write_private(out / private_name, private)
        _write_public(out / public_name, public)
        written += [out / private_name, out / public_name]
    return written
