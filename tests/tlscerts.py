"""Throwaway certificates for the TLS tests, made with cryptography: a CA,
a server certificate for 127.0.0.1, client certificates, an expired one and
another CA's."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pair:
    cert: str
    key: str


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(directory, name, cert, key):
    cert_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return Pair(cert_path, key_path)


def _name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


class Authority:
    """A CA that signs certificates into ``directory``."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pair = _write(directory, name, self.cert, self.key)

    def issue(self, name: str, server: bool = True, days: float = 30, expired: bool = False) -> Pair:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired \
            else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=days))
        builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return _write(self.directory, name, builder.sign(self.key, hashes.SHA256()), key)


class Pki:
    """What the TLS tests use: our CA ``ca`` with a server certificate, a
    client certificate and an expired server certificate; another CA
    ``other`` with a client certificate of its own (``stranger``)."""

    def __init__(self, directory: str) -> None:
        self.ca = Authority(directory, "dx-ca")
        self.other = Authority(directory, "other-ca")
        self.server = self.ca.issue("server")
        self.client = self.ca.issue("client", server=False)
        self.expired = self.ca.issue("expired", expired=True)
        self.stranger = self.other.issue("stranger", server=False)
