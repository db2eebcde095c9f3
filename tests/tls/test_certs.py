"""The interception CA and its leaves: `outgate ca init`, CA loading, minted leaves (SAN and
validity), the bounded cache, and one mint per name however many ask at once."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.core.hosts import Host, parse_host
from proxy.errors import ConfigError
from proxy.tls.ca import CA_VALIDITY, CertificateAuthority, create_ca, init_ca, load_ca
from proxy.tls.certs import (
    LEAF_BACKDATE,
    LEAF_VALIDITY,
    CertCache,
    Leaf,
    mint_certificate,
    mint_leaf,
)
from tests.support.proxyproc import outgate_command


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return create_ca()


def test_ca_init_writes_a_kubernetes_tls_pair_with_a_private_key_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [*outgate_command(), "ca", "init", "--dir", str(tmp_path / "ca")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    cert_path, key_path = tmp_path / "ca" / "tls.crt", tmp_path / "ca" / "tls.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert "kubectl create secret tls" in result.stdout
    loaded = load_ca(str(cert_path), str(key_path))
    constraints = loaded.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    lifetime = loaded.cert.not_valid_after_utc - loaded.cert.not_valid_before_utc
    assert CA_VALIDITY <= lifetime <= CA_VALIDITY + datetime.timedelta(hours=2)
    again = subprocess.run(
        [*outgate_command(), "ca", "init", "--dir", str(tmp_path / "ca")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "exists" in again.stderr
    assert load_ca(str(cert_path), str(key_path)).cert == loaded.cert  # not replaced


def test_ca_init_force_replaces_and_keeps_the_key_private(tmp_path: Path) -> None:
    init_ca(tmp_path)
    (tmp_path / "tls.key").chmod(0o644)
    init_ca(tmp_path, force=True)
    assert stat.S_IMODE((tmp_path / "tls.key").stat().st_mode) == 0o600


def test_loading_a_mismatched_or_non_ca_pair_is_a_config_error(tmp_path: Path) -> None:
    one, two = init_ca(tmp_path / "one"), init_ca(tmp_path / "two")
    with pytest.raises(ConfigError) as info:
        load_ca(str(one[0]), str(two[1]))
    assert [issue.path for issue in info.value.issues] == ["tls.caKey"]
    leaf_cert, leaf_key = mint_certificate(load_ca(str(one[0]), str(one[1])), parse_host("a.test"))
    (tmp_path / "leaf.crt").write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError) as info:
        load_ca(str(tmp_path / "leaf.crt"), str(tmp_path / "leaf.key"))
    assert "not a CA certificate" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_ca(str(tmp_path / "missing.crt"), str(one[1]))
    assert info.value.issues[0].path == "tls.caCert"


@pytest.mark.parametrize(
    "host", ["api.example.com", "xn--bcher-kva.example", "203.0.113.7", "2001:db8::1"]
)
def test_a_leaf_names_exactly_the_connect_host_and_is_short_lived(
    ca: CertificateAuthority, host: str
) -> None:
    target = parse_host(f"[{host}]" if ":" in host else host)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert, key = mint_certificate(ca, target)
    after = datetime.datetime.now(datetime.UTC)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if target.ip is not None:
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(host)]
        assert san.get_values_for_type(x509.DNSName) == []
    else:
        assert san.get_values_for_type(x509.DNSName) == [host]
        assert san.get_values_for_type(x509.IPAddress) == []
    assert len(list(san)) == 1
    assert before - LEAF_BACKDATE <= cert.not_valid_before_utc <= after - LEAF_BACKDATE
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == LEAF_VALIDITY + LEAF_BACKDATE
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)


def test_every_leaf_has_its_own_key(ca: CertificateAuthority) -> None:
    one, _ = mint_certificate(ca, parse_host("one.example"))
    two, _ = mint_certificate(ca, parse_host("two.example"))
    assert one.public_key() != two.public_key()


def test_a_leaf_never_outlives_its_ca() -> None:
    short = create_ca(validity=datetime.timedelta(days=2))
    cert, _ = mint_certificate(short, parse_host("a.example"))
    assert cert.not_valid_after_utc == short.not_after


def handshake(leaf: Leaf, ca: CertificateAuthority, server_hostname: str) -> str | None:
    """A TLS handshake in memory between a client trusting `ca` and the leaf's context."""
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = leaf.context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, out, into in ((client, c_out, s_in), (server, s_out, c_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            into.write(out.read())
        if client.version() is not None and server.version() is not None:
            try:
                client.do_handshake()
                server.do_handshake()
                return client.selected_alpn_protocol()
            except ssl.SSLWantReadError:
                continue
    raise AssertionError("handshake did not finish")


def test_a_minted_leaf_is_trusted_by_a_client_trusting_the_ca_for_its_name_only(
    ca: CertificateAuthority,
) -> None:
    leaf = mint_leaf(ca, parse_host("api.example.com"))
    assert handshake(leaf, ca, "api.example.com") == "http/1.1"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(leaf, ca, "other.example.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(leaf, create_ca(), "api.example.com")


async def test_concurrent_requests_for_one_new_name_mint_it_once(ca: CertificateAuthority) -> None:
    cache = CertCache(ca, size=8)
    try:
        leaves = await asyncio.gather(
            *(cache.leaf_for(parse_host("new.example")) for _ in range(50))
        )
        assert cache.minted == 1
        assert cache.hits == 49
        assert len({id(leaf) for leaf in leaves}) == 1
        assert (await cache.leaf_for(parse_host("new.example"))) is leaves[0]
        assert cache.minted == 1
    finally:
        cache.close()


async def test_a_cancelled_waiter_does_not_cancel_the_mint_others_wait_for(
    ca: CertificateAuthority,
) -> None:
    cache = CertCache(ca)
    try:
        first = asyncio.ensure_future(cache.leaf_for(parse_host("shared.example")))
        second = asyncio.ensure_future(cache.leaf_for(parse_host("shared.example")))
        await asyncio.sleep(0)
        first.cancel()
        leaf = await second
        assert leaf.host == "shared.example" and cache.minted == 1
    finally:
        cache.close()


def _fast_mint(template: Leaf) -> object:
    def mint(_ca: CertificateAuthority, host: Host) -> Leaf:
        return Leaf(host=host.name, cert=template.cert, context=template.context)

    return mint


async def test_ten_thousand_distinct_names_keep_the_cache_at_its_bound(
    ca: CertificateAuthority,
) -> None:
    """The bound is the cache's, not the minter's: real leaves would take ~30 s to mint here, so
    the mint is a stand-in that returns a prepared leaf (real minting is tested above)."""
    template = mint_leaf(ca, parse_host("template.example"))
    cache = CertCache(ca, size=256, mint=_fast_mint(template))  # type: ignore[arg-type]
    try:
        for index in range(10_000):
            await cache.leaf_for(parse_host(f"host-{index}.example"))
            assert len(cache) <= 256
        assert cache.minted == 10_000
        assert len(cache) == 256
        assert "host-9999.example" in cache and "host-0.example" not in cache
        # Least recently used goes first: touching an old entry keeps it.
        await cache.leaf_for(parse_host("host-9744.example"))
        await cache.leaf_for(parse_host("one-more.example"))
        assert "host-9744.example" in cache and "host-9745.example" not in cache
    finally:
        cache.close()


async def test_real_leaves_for_many_names_stay_within_the_bound(ca: CertificateAuthority) -> None:
    cache = CertCache(ca, size=16)
    try:
        await asyncio.gather(*(cache.leaf_for(parse_host(f"n{i}.example")) for i in range(40)))
        assert len(cache) == 16 and cache.minted == 40
    finally:
        cache.close()


async def test_a_failed_mint_is_not_cached_and_is_retried(ca: CertificateAuthority) -> None:
    calls = 0

    def flaky(authority: CertificateAuthority, host: Host) -> Leaf:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("hsm hiccup")
        return mint_leaf(authority, host)

    cache = CertCache(ca, mint=flaky)
    try:
        with pytest.raises(RuntimeError):
            await cache.leaf_for(parse_host("retry.example"))
        assert "retry.example" not in cache
        leaf = await cache.leaf_for(parse_host("retry.example"))
        assert leaf.host == "retry.example" and calls == 2
    finally:
        cache.close()
