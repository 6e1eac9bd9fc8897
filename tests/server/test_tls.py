"""`dpfl certs`: the TLS material, checked against the loaders Flower itself uses."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.errors import DpflError
from server.tls import write_tls_material


def test_certs_have_the_formats_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    write_tls_material(tmp_path, ["superlink.example.org", "203.0.113.7"], supernodes=2)

    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink.example.org", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"203.0.113.7", "127.0.0.1"} <= ips

    for index in range(2):
        private = load_ssh_private_key((tmp_path / f"supernode-{index}.key").read_bytes(), None)
        registered = try_load_public_key(tmp_path / f"supernode-{index}.pub")  # `flwr supernode register`
        assert registered == public_key_to_bytes(private.public_key())

    for name in ("ca.key", "superlink.key", "supernode-0.key", "supernode-1.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "superlink.crt", "supernode-0.pub"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_certs_never_overwrite_and_reject_bad_hosts(tmp_path):
    write_tls_material(tmp_path, ["localhost"], supernodes=1)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(DpflError, match="already exists"):
        write_tls_material(tmp_path, ["localhost"], supernodes=1)
    assert (tmp_path / "ca.key").read_bytes() == before

    with pytest.raises(DpflError, match="--host 'https://x:9092' is invalid"):
        write_tls_material(tmp_path / "new", ["https://x:9092"])
    assert not (tmp_path / "new").exists()


def test_certs_can_make_only_supernode_keys(tmp_path):
    # A client machine makes its own key pair and hands over only the public key.
    written = write_tls_material(tmp_path, supernodes=1)
    assert sorted(p.name for p in written) == ["supernode-0.key", "supernode-0.pub"]
    with pytest.raises(DpflError, match="nothing to create"):
        write_tls_material(tmp_path / "empty")
