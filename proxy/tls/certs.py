"""Leaf certificates for interception: minted by the cluster CA, kept in a bounded LRU cache.

One leaf per CONNECT host, its SAN exactly that host (a DNS name, or an IP address for an IP
CONNECT). Minting runs on a small thread pool, never on the event loop, and at most once per
name at a time: concurrent interceptions of a new name wait for the one mint under way.
As in mitmproxy's certs.py, every constant below says where its number comes from.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import metrics
from proxy.core.hosts import Host
from proxy.fdio import pem_path
from proxy.tls.ca import CertificateAuthority

# A leaf lives in memory only and is re-minted for the asking, so it can be short-lived: a leaked
# leaf key is worth a week at most. Far inside the 398 days browsers accept (CA/B Forum BR 6.3.2)
# and Apple's 825-day limit for locally trusted roots.
LEAF_VALIDITY: Final = datetime.timedelta(days=7)
# Clients whose clock is a little behind the proxy's must not see a certificate from the future.
# Pods share their node's NTP-synced clock, so minutes would do; an hour also covers a VM (a
# static identity) resuming with a stale clock. mitmproxy's two days are for consumer devices.
LEAF_BACKDATE: Final = datetime.timedelta(hours=1)
# A cached leaf is re-minted this long before it expires, so no handshake gets one about to lapse
# (a client whose clock runs ahead by less than this still accepts it).
LEAF_RENEW_BEFORE: Final = datetime.timedelta(days=1)
# Per-leaf ECDSA P-256 keys, decided by measurement (bench/tls_bench.py, "mint" rows): a fresh
# P-256 key adds ~0.13 ms to a ~2.7 ms mint (SSLContext loading dominates), so reusing one key
# across leaves, as mitmproxy does to avoid RSA key generation (~80 ms), buys nothing here, and
# separate keys mean one leaked leaf key impersonates one name, not every inspected host.
LEAF_CURVE: Final = ec.SECP256R1()
# Distinct inspected hosts are few (rules with `inspect` name specific APIs); 1024 leaves and
# their SSLContexts are a few MiB. A flood of new names (wildcard rules) only evicts, never grows.
DEFAULT_CACHE_SIZE: Final = 1024
# Minting is CPU work: two threads keep a burst of new names from taking every core from the
# event loop, while one slow mint does not hold up the next.
MINT_THREADS: Final = 2
# X.509 ub-common-name (RFC 5280 appendix A): 64 characters. Longer names go in the SAN only.
MAX_COMMON_NAME: Final = 64
# What the client side of an interception speaks: the inner requests are parsed as HTTP/1.1.
ALPN_PROTOCOLS: Final = ("http/1.1",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Leaf:
    host: str
    cert: x509.Certificate
    context: ssl.SSLContext  # a server context holding this leaf, its key and the CA

    @property
    def renew_at(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc - LEAF_RENEW_BEFORE


def mint_certificate(
    ca: CertificateAuthority, host: Host, *, now: datetime.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for exactly `host`, signed by `ca`, with a fresh key."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(LEAF_CURVE)
    san: x509.GeneralName = (
        x509.IPAddress(host.ip) if host.ip is not None else x509.DNSName(host.name)
    )
    subject = (
        [x509.NameAttribute(NameOID.COMMON_NAME, host.name)]
        if len(host.name) <= MAX_COMMON_NAME
        else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - LEAF_BACKDATE)
        # A leaf never outlives the CA that vouches for it.
        .not_valid_after(min(now + LEAF_VALIDITY, ca.not_after))
        .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    return builder.sign(ca.key, hashes.SHA256()), key


def server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context for one leaf. TLS 1.2+, ALPN http/1.1, no renegotiation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    with pem_path(chain_pem + key_pem) as path:
        context.load_cert_chain(path)
    return context


def mint_leaf(ca: CertificateAuthority, host: Host) -> Leaf:
    """Mint and load a leaf: the whole CPU-bound job the cache runs on its thread pool."""
    cert, key = mint_certificate(ca, host)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem
    return Leaf(host=host.name, cert=cert, context=server_context(chain, key_pem))


class CertCache:
    """Leaves by host name: bounded LRU, renewed before expiry, one mint per name at a time.

    Used from one event loop; the only work off the loop is `mint` on the thread pool.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        size: int = DEFAULT_CACHE_SIZE,
        mint: Callable[[CertificateAuthority, Host], Leaf] = mint_leaf,
    ) -> None:
        if size < 1:
            raise ValueError("the certificate cache holds at least one leaf")
        self.ca = ca
        self.size = size
        self._mint = mint
        self._leaves: OrderedDict[str, Leaf] = OrderedDict()
        self._minting: dict[str, asyncio.Future[Leaf]] = {}
        self._executor = ThreadPoolExecutor(max_workers=MINT_THREADS, thread_name_prefix="mint")
        self.minted = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._leaves)

    def __contains__(self, name: object) -> bool:
        return name in self._leaves

    async def leaf_for(self, host: Host) -> Leaf:
        name = host.name
        leaf = self._leaves.get(name)
        if leaf is not None and datetime.datetime.now(datetime.UTC) < leaf.renew_at:
            self._leaves.move_to_end(name)
            self._hit()
            return leaf
        pending = self._minting.get(name)
        if pending is not None:
            self._hit()
        else:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(self._executor, self._mint, self.ca, host)
            )
            self._minting[name] = pending
            pending.add_done_callback(lambda done: self._minted(name, done))
        # shield: a cancelled waiter (its client left) must not cancel the mint the others await.
        return await asyncio.shield(pending)

    def _hit(self) -> None:
        self.hits += 1
        metrics.CERT_CACHE_HITS.inc()

    def _minted(self, name: str, done: asyncio.Future[Leaf]) -> None:
        self._minting.pop(name, None)
        if done.cancelled() or done.exception() is not None:
            return  # not cached: the next interception of this name tries again
        self.minted += 1
        metrics.CERTS_MINTED.inc()
        self._leaves[name] = done.result()
        self._leaves.move_to_end(name)
        while len(self._leaves) > self.size:
            self._leaves.popitem(last=False)
        metrics.CERT_CACHE_ENTRIES.set(len(self._leaves))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
