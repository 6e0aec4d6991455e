"""Shared pieces of the TLS tests: a throwaway CA, certificates, TLS clients."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from beacon.config import HostPort


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


@dataclass
class TestCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    __test__ = False

    @classmethod
    def create(cls, name: str = "Beacon test CA") -> TestCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names: str, days: float = 10, ips: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """A leaf for `names`: (chain PEM, key PEM)."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write_pair(self, directory: Path, stem: str, *names: str, days: float = 10) -> bytes:
        chain, key = self.issue(*names, days=days)
        (directory / f"{stem}.key").write_bytes(key)
        (directory / f"{stem}.crt").write_bytes(chain)
        return chain


def client_context(ca_pem: bytes | None, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode() if ca_pem is not None else None)
    if ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


async def tls_connect(address: HostPort, server_name: str | None, ca_pem: bytes | None,
                      alpn: tuple[str, ...] = ("http/1.1",)) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
    return await asyncio.wait_for(asyncio.open_connection(
        address.host, address.port, ssl=client_context(ca_pem, alpn),
        server_hostname=server_name or "", ssl_handshake_timeout=5), 10)  # fmt: skip


def peer_cert(writer: asyncio.StreamWriter) -> x509.Certificate:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
              path: str = "/") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One keep-alive GET over an open connection."""
    from tests.proxy.proxytest import read_response

    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    return await asyncio.wait_for(read_response(reader), 10)


async def run(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    """Run a client program without blocking the loop the proxy runs in."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
