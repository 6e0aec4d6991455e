"""Certificates in memory: PEM pairs -> SSL contexts, and the SNI index over them.

Cipher policy (Mozilla "intermediate", without finite-field DHE): TLS 1.2 and
1.3 only; TLS 1.3 uses OpenSSL's default suites (AES-256-GCM, ChaCha20-Poly1305,
AES-128-GCM); TLS 1.2 is limited to ECDHE key exchange with AEAD ciphers
(`TLS12_CIPHERS`). No compression, no renegotiation. Every context offers
ALPN `http/1.1` only (HTTP/2 is not served).

A private key never touches the disk here: PEM bytes are loaded into OpenSSL
through an anonymous memory file (`memfd_create`), since `ssl` only loads
certificate chains from paths.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID, ObjectIdentifier

TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))  # fmt: skip
ALPN_HTTP1 = "http/1.1"
ALPN_ACME = "acme-tls/1"
# RFC 8737: the certificate extension carrying SHA-256(key authorization).
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
MAX_PEM_SIZE = 1 << 20
MAX_DIR_FILES = 10000


def server_context(alpn: Iterable[str] = (ALPN_HTTP1,)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a PEM chain and key into `ctx` from memory (raises ssl.SSLError / ValueError)."""
    fd = os.memfd_create("beacon-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem.rstrip(b"\n") + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


@dataclass(frozen=True, eq=False)
class Certificate:
    """A served certificate: its DNS names, validity, PEM bytes and SSL context."""

    names: tuple[str, ...]  # SAN DNS names, lowercase ("*.example.com" for a wildcard)
    not_before: float  # Unix seconds
    not_after: float
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    context: ssl.SSLContext = field(repr=False)
    origin: str = ""  # "file NAME.crt" or "acme"

    @property
    def fingerprint(self) -> str:
        leaf = x509.load_pem_x509_certificate(self.chain_pem)
        return leaf.fingerprint(hashes.SHA256()).hex()

    def renew_at(self) -> float:
        """Two thirds into the lifetime: 60 of 90 days, 4 of 6 (short-lived certificates)."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


def load_pair(chain_pem: bytes, key_pem: bytes, origin: str = "") -> Certificate:
    """Parse and check a PEM chain (leaf first) and its key. Raises ValueError with a reason."""
    if len(chain_pem) > MAX_PEM_SIZE or len(key_pem) > MAX_PEM_SIZE:
        raise ValueError("PEM file larger than 1 MiB")
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"no PEM certificate ({exc})") from None
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        pass
    if not names:
        raise ValueError("certificate has no DNS name in its subjectAltName")
    ctx = server_context()
    try:
        load_chain(ctx, chain_pem, key_pem)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"certificate and key do not load together ({exc})") from None
    return Certificate(
        names=tuple(dict.fromkeys(names)),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        chain_pem=chain_pem,
        key_pem=key_pem,
        context=ctx,
        origin=origin,
    )


def matches(pattern: str, host: str) -> bool:
    """TLS name matching: exact, or a leading "*." covering exactly one label."""
    if pattern == host:
        return True
    if pattern.startswith("*."):
        dot = host.find(".")
        return dot > 0 and host[dot + 1 :] == pattern[2:]
    return False


@dataclass(slots=True)
class CertIndex:
    """Name -> certificate, built whenever the set of certificates changes (pure)."""

    exact: dict[str, Certificate] = field(default_factory=dict)
    wildcard: dict[str, Certificate] = field(default_factory=dict)  # key: "example.com" for *.example.com

    @classmethod
    def build(cls, certs: Iterable[Certificate]) -> CertIndex:
        """Earlier certificates win a name; within that, the one expiring last."""
        index = cls()
        for cert in certs:
            for name in cert.names:
                table, key = (index.wildcard, name[2:]) if name.startswith("*.") else (index.exact, name)
                old = table.get(key)
                if old is None or (old.origin == cert.origin and old.not_after < cert.not_after):
                    table[key] = cert
        return index

    def lookup(self, host: str) -> Certificate | None:
        cert = self.exact.get(host)
        if cert is None:
            dot = host.find(".")
            if dot > 0:
                cert = self.wildcard.get(host[dot + 1 :])
        return cert


# ------------------------------------------------------------- certificate dir
def dir_signature(root: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a file in the directory changes (name, inode, size, mtime)."""
    out = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)[:MAX_DIR_FILES]
    except OSError:
        return ()
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            continue
        out.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_cert_dir(root: Path, previous: Mapping[str, Certificate]) -> tuple[dict[str, Certificate], list[str]]:
    """Every `NAME.crt` (or `NAME.pem`) with its `NAME.key` in `root`.

    Returns {NAME: certificate} and problems. A pair that fails to load keeps
    its previous version (a certificate copied in two steps is not dropped
    between them).
    """
    found: dict[str, Certificate] = {}
    problems: list[str] = []
    try:
        files = {p.name: p for p in sorted(root.iterdir())[:MAX_DIR_FILES] if p.is_file()}
    except OSError as exc:
        return dict(previous), [f"cannot read {root}: {exc}"]
    for fname, path in files.items():
        stem, dot, ext = fname.rpartition(".")
        if not dot or ext not in ("crt", "pem") or stem.startswith("."):
            continue
        key_path = files.get(stem + ".key")
        if key_path is None:
            problems.append(f"{fname}: no {stem}.key next to it")
            continue
        try:
            cert = load_pair(path.read_bytes()[: MAX_PEM_SIZE + 1], key_path.read_bytes()[: MAX_PEM_SIZE + 1],
                             origin=f"file {fname}")  # fmt: skip
        except (OSError, ValueError) as exc:
            problems.append(f"{fname}: {exc}")
            if stem in previous:
                found[stem] = previous[stem]
            continue
        found[stem] = cert
    return found, problems


# ---------------------------------------------------------- generated certificates
def new_key_pem() -> bytes:
    """A fresh ECDSA P-256 private key, PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def tls_alpn_challenge_context(host: str, key_authorization: str) -> ssl.SSLContext:
    """The RFC 8737 self-signed certificate for a TLS-ALPN-01 challenge, in a
    context that offers only the `acme-tls/1` protocol."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        # The extension's value is the DER encoding of an OCTET STRING of the digest.
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    ctx = server_context(alpn=(ALPN_ACME,))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    load_chain(ctx, cert.public_bytes(serialization.Encoding.PEM), key_pem)
    return ctx


FALLBACK_NAME = "unknown.beacon.invalid"


def self_signed(host: str = FALLBACK_NAME, days: int = 3650) -> Certificate:
    """A self-signed certificate: what a client that names no known host gets
    when no default certificate is configured (the client's verification fails
    with a clear "certificate not trusted" instead of a bare connection reset -
    asyncio closes a failed handshake without sending its alert)."""
    key_pem = new_key_pem()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Beacon default certificate")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return load_pair(cert.public_bytes(serialization.Encoding.PEM), key_pem, origin="self-signed fallback")

