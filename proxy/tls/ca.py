"""The cluster CA that signs interception leaves: create it (`outgate ca init`) and load it.

The CA's certificate goes into every inspected workload's trust store; its key stays in one
Kubernetes Secret mounted into the proxy. `init_ca` writes the pair under the names a
`kubernetes.io/tls` Secret uses (`tls.crt`, `tls.key`), the key file created with mode 0600.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.errors import ConfigError, ConfigIssue

# The CA is in every inspected pod's trust store, so replacing it is a rollout: it lives far longer
# than a leaf. Two years bounds what a stolen CA key is worth and keeps rotation a practised,
# roughly yearly task rather than a forgotten one (mitmproxy's 10 years suits a laptop, not a
# cluster).
CA_VALIDITY: Final = datetime.timedelta(days=730)
# Same reason as certs.LEAF_BACKDATE: a client whose clock is slightly behind must not see a
# certificate from the future.
CA_BACKDATE: Final = datetime.timedelta(hours=1)
# ECDSA P-256: every TLS 1.2+ client verifies it, and signing a leaf costs half of what RSA-2048
# does (measured in bench/tls_bench.py), which is on the path of every cold interception.
CA_CURVE: Final = ec.SECP256R1()
DEFAULT_COMMON_NAME: Final = "Outgate egress inspection CA"
CERT_FILE: Final = "tls.crt"
KEY_FILE: Final = "tls.key"
# Owner read/write only: the key signs certificates every inspected workload trusts.
KEY_FILE_MODE: Final = 0o600

CAPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: CAPrivateKey
    cert_pem: bytes

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc


def create_ca(
    *,
    common_name: str = DEFAULT_COMMON_NAME,
    validity: datetime.timedelta = CA_VALIDITY,
    now: datetime.datetime | None = None,
) -> CertificateAuthority:
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(CA_CURVE)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Outgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + validity)
        # path_length=0: this CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(
        cert=cert, key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM)
    )


def init_ca(
    directory: Path,
    *,
    common_name: str = DEFAULT_COMMON_NAME,
    validity: datetime.timedelta = CA_VALIDITY,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write a new CA as `directory/tls.crt` and `directory/tls.key` (0600). Refuses to replace
    existing files unless `force`. Raises FileExistsError or OSError."""
    ca = create_ca(common_name=common_name, validity=validity)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600 from the start (never written under a wider mode first), then re-chmodded in
    # case --force replaced a file that had other bits.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    fd = os.open(key_path, flags, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), KEY_FILE_MODE)
        out.write(key_pem)
    cert_path.write_bytes(ca.cert_pem)
    return cert_path, key_path


def load_ca(cert_path: str, key_path: str, *, source: str = "<config>") -> CertificateAuthority:
    """Load and check the CA pair named by `tls.caCert` / `tls.caKey`; ConfigError if unusable."""
    issues: list[ConfigIssue] = []

    def issue(path: str, message: str, fix: str) -> None:
        issues.append(ConfigIssue(file=source, document=None, path=path, message=message, fix=fix))

    cert: x509.Certificate | None = None
    key: object = None
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        issue("tls.caCert", f"cannot read a PEM certificate from {cert_path}: {exc}", _INIT_FIX)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        issue("tls.caKey", f"cannot read an unencrypted PEM key from {key_path}: {exc}", _INIT_FIX)
    if cert is not None and key is not None:
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            issue("tls.caKey", f"{type(key).__name__} keys are not supported", "use ECDSA or RSA")
        elif key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            issue("tls.caKey", f"{key_path} is not the key of {cert_path}", "pair them again")
        _check_is_ca(cert, cert_path, issue)
    if issues:
        raise ConfigError(issues)
    assert cert is not None and isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return CertificateAuthority(
        cert=cert, key=key, cert_pem=cert.public_bytes(serialization.Encoding.PEM)
    )


_INIT_FIX = "create one with `outgate ca init --dir DIR` and point tls.caCert/caKey at it"


def _check_is_ca(
    cert: x509.Certificate, cert_path: str, issue: Callable[[str, str, str], None]
) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        issue("tls.caCert", f"{cert_path} is not a CA certificate (basicConstraints)", _INIT_FIX)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        issue("tls.caCert", f"{cert_path} may not sign certificates (keyUsage)", _INIT_FIX)
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        issue(
            "tls.caCert", f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}", _INIT_FIX
        )
