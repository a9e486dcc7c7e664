"""TLS material of the ext_proc server: a certificate directory (``tls.crt`` / ``tls.key``, the
layout of a Kubernetes TLS secret) or a self-signed certificate made at start, as the Go EPP
does by default. Gateways dial the EPP with an empty validation context, so any certificate
works; a CA-signed one is for gateways configured to verify it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from kvaware_scorer.errors import ConfigError

__all__ = ["load_certificate", "self_signed"]


def self_signed(hostname: str = "kvaware-epp", days: int = 365) -> tuple[bytes, bytes]:
    """A fresh self-signed certificate: ``(key_pem, cert_pem)`` (ECDSA P-256).

    Raises:
        ImportError: ``cryptography`` is missing (``pip install 'kvaware-scorer[epp]'``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_certificate(cert_path: str | Path) -> tuple[bytes, bytes]:
    """``(key_pem, cert_pem)`` from a directory holding ``tls.key`` and ``tls.crt``.

    Raises:
        ConfigError: A file is missing or unreadable.
    """
    base = Path(cert_path)
    out: list[bytes] = []
    for name in ("tls.key", "tls.crt"):
        try:
            out.append((base / name).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {name}: {exc.strerror or exc}", str(base)) from None
    return out[0], out[1]
