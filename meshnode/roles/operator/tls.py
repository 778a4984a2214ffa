"""The operator's TLS key and self-signed certificate for the enrollment API, made on first start.

Nodes pin the certificate's SHA-256 fingerprint, so an existing certificate is never replaced:
a broken one stops the operator instead.
"""

import datetime
import hashlib
import ipaddress
import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger

from meshnode.errors import StartupError
from meshnode.core.identity import write_private

_log = Logger()

KEY_FILE = "operator-tls.key"
CERTIFICATE_FILE = "operator-tls.pem"
COMMON_NAME = "meshnode operator"
VALIDITY = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(days=1)  # accepted by clients whose clocks run a little behind


@attrs.frozen
class OperatorTLS:
    """Where the operator's TLS key and certificate are, and the certificate's fingerprint."""

    key_path: str
    cert_path: str
    fingerprint: str


def fingerprint_of(pem_bytes):
    """Lowercase hex SHA-256 of the DER encoding of the (first) certificate in `pem_bytes`."""
    certificate = x509.load_pem_x509_certificate(pem_bytes)
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _public_der(key):
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _alternative_name(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _make_certificate(key, now, hostnames):
    names = []
    for name in ("localhost", "127.0.0.1", *hostnames):
        alternative = _alternative_name(name)
        if alternative not in names:
            names.append(alternative)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))


def _load_key(path):
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise StartupError(f"the operator's TLS key {path} is unusable ({e}); restore it "
                           f"or remove both {KEY_FILE} and {CERTIFICATE_FILE}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StartupError(f"the operator's TLS key {path} is not an EC key")
    return key


def _load_certificate(path, key):
    try:
        with open(path, "rb") as f:
            pem = f.read()
        certificate = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as e:
        raise StartupError(f"the operator's TLS certificate {path} is unusable ({e}); nodes "
                           f"pin its fingerprint, so restore it rather than make a new one"
                           ) from None
    if _public_der(certificate) != _public_der(key):
        raise StartupError(f"the operator's TLS certificate {path} is not for the key "
                           f"beside it")
    return pem, certificate


def load_or_create_tls(state_dir, clock, hostnames=()):
    """Load the operator's TLS key and certificate from `state_dir`, making them on first start.

    `hostnames` (DNS names or IP addresses) are added to localhost and 127.0.0.1 in the
    certificate's subjectAltName when it is made; they do not change an existing certificate.
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    key_path = os.path.join(state_dir, KEY_FILE)
    cert_path = os.path.join(state_dir, CERTIFICATE_FILE)
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc)
    if os.path.exists(key_path):
        key = _load_key(key_path)
    elif os.path.exists(cert_path):
        raise StartupError(f"{cert_path} exists but its key {key_path} is missing")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    if os.path.exists(cert_path):
        pem, certificate = _load_certificate(cert_path, key)
        if certificate.not_valid_after_utc <= now:
            _log.warn("the operator's TLS certificate {path} expired on {date}: nodes that "
                      "check it against a CA file refuse it", path=cert_path,
                      date=certificate.not_valid_after_utc.date().isoformat())
    else:
        # No node can have pinned a certificate that was never written: making one is safe.
        certificate = _make_certificate(key, now, hostnames)
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        write_private(cert_path, pem)
        _log.info("made the operator's TLS certificate {path}, SHA-256 {fingerprint}",
                  path=cert_path, fingerprint=fingerprint_of(pem))
    return OperatorTLS(key_path, cert_path, fingerprint_of(pem))


def context_for(certificate):
    """A TLS server context with the operator's key and certificate (an OperatorTLS), for its
    fallback port: the enrollment API there shows the certificate nodes pin. ALPN: HTTP/1.1
    for clients that offer it (RPC clients offer nothing)."""
    with open(certificate.key_path, "rb") as f:
        key = f.read()
    with open(certificate.cert_path, "rb") as f:
        pem = f.read()
    private = ssl.PrivateCertificate.loadPEM(key + pem)
    return ssl.CertificateOptions(privateKey=private.privateKey.original,
                                  certificate=private.original,
                                  acceptableProtocols=[b"http/1.1"])


def _split_description(description):
    """The ':'-separated parts of an endpoint description, with backslash escapes undone."""
    parts, current, characters = [], "", iter(description)
    for character in characters:
        if character == "\\":
            current += next(characters, "")
        elif character == ":":
            parts.append(current)
            current = ""
        else:
            current += character
    parts.append(current)
    return parts


def server_endpoint_string(description, key_path, cert_path):
    """An "ssl:..." server endpoint description with this key and certificate added.

    A description that names its own privateKey or certKey, or is not "ssl:" (a "tcp:" listener
    behind a TLS terminator, say), is returned unchanged.
    """
    parts = _split_description(description)
    if parts[0].lower() != "ssl":
        return description
    if any(part.startswith(("privateKey=", "certKey=")) for part in parts[1:]):
        return description
    return (f"{description}:privateKey={quoteStringArgument(key_path)}"
            f":certKey={quoteStringArgument(cert_path)}")
