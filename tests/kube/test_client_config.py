"""The API client's own parts: watch line splitting, kubeconfig and in-cluster config, token
re-reads, and a session that ignores HTTP(S)_PROXY."""

from __future__ import annotations

import base64
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import settings_from_mapping
from proxy.control.kube.client import KubeClient, LineSplitter, LineTooLong
from proxy.control.kube.config import TokenSource, in_cluster_config, load_kubeconfig
from proxy.errors import ConfigError
from tests.support.fakekube import FakeKube
from tests.support.pki import make_pki

# -- line splitting ---------------------------------------------------------------------------

EVENT = '{"type":"ADDED","object":{"note":"café ✓"}}\n'.encode()


def feed_all(pieces: list[bytes], limit: int = 1 << 20) -> list[bytes]:
    splitter = LineSplitter(limit)
    lines: list[bytes] = []
    for piece in pieces:
        lines.extend(splitter.feed(piece))
    assert splitter.pending == 0
    return lines


SPLITS = [
    ("whole", [EVENT]),
    ("byte by byte", [EVENT[i : i + 1] for i in range(len(EVENT))]),
    ("inside the é", [EVENT[: EVENT.index(b"\xc3") + 1], EVENT[EVENT.index(b"\xc3") + 1 :]]),
    ("inside the ✓", [EVENT[: EVENT.index(b"\xe2") + 2], EVENT[EVENT.index(b"\xe2") + 2 :]]),
    ("two lines in one piece, split third", [EVENT + EVENT + EVENT[:5], EVENT[5:]]),
    ("CRLF and blank lines", [EVENT.replace(b"\n", b"\r\n") + b"\n\n" + EVENT]),
]


@pytest.mark.parametrize(("case", "pieces"), SPLITS, ids=[s[0] for s in SPLITS])
def test_lines_come_out_whole_however_the_bytes_arrive(case: str, pieces: list[bytes]) -> None:
    lines = feed_all(pieces)
    assert lines and all(line == EVENT.rstrip(b"\n") for line in lines)
    assert all(line.decode("utf-8") for line in lines)


def test_a_line_over_the_cap_is_refused_before_its_end_arrives() -> None:
    splitter = LineSplitter(1000)
    splitter.feed(b"x" * 900)
    with pytest.raises(LineTooLong):
        splitter.feed(b"x" * 200)


def test_a_five_mebibyte_line_in_small_pieces_is_assembled() -> None:
    line = b'{"blob":"' + b"a" * (5 << 20) + b'"}\n'
    splitter = LineSplitter()
    out: list[bytes] = []
    for start in range(0, len(line), 4096):
        out.extend(splitter.feed(line[start : start + 4096]))
    assert out == [line[:-1]]


# -- kubeconfig -------------------------------------------------------------------------------


def write_kubeconfig(tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [
                    {"name": "other", "context": {"cluster": "missing", "user": "u"}},
                    {"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "ns1"}},
                ],
                "current-context": "dev",
            }
        )
    )
    return path


def embedded_kubeconfig(directory: Path) -> Path:
    """A kubeconfig carrying its CA, client certificate and key inline (as kind writes one)."""
    pki = make_pki(directory / "pki", ["127.0.0.1"])

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return write_kubeconfig(
        directory,
        {"server": "https://127.0.0.1:6443/", "certificate-authority-data": b64(pki.ca_pem)},
        {"client-certificate-data": b64(pki.cert_pem), "client-key-data": b64(pki.key_pem)},
    )


def test_kubeconfig_with_ca_data_and_client_certificate_data(tmp_path: Path) -> None:
    config = load_kubeconfig(embedded_kubeconfig(tmp_path))
    assert config.server == "https://127.0.0.1:6443"
    assert config.namespace == "ns1"
    assert config.token is None
    assert config.ssl_context is not None
    assert config.ssl_context.verify_mode is ssl.CERT_REQUIRED
    assert config.ssl_context.get_ca_certs()[0]["subject"] == (
        (("commonName", "Outgate test CA"),),
    )


def test_client_certificate_data_loads_without_a_usable_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run --read-only` with no /tmp: the embedded key is handed to ssl from memory,
    never written to a temporary file."""
    path = embedded_kubeconfig(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-directory"))
    assert load_kubeconfig(path).ssl_context is not None


def test_kubeconfig_relative_paths_resolve_against_its_directory(tmp_path: Path) -> None:
    make_pki(tmp_path / "pki", ["127.0.0.1"])
    (tmp_path / "token").write_text("from-file\n")
    path = write_kubeconfig(
        tmp_path,
        {"server": "https://k:6443", "certificate-authority": "pki/ca.pem"},
        {"tokenFile": "token"},
    )
    config = load_kubeconfig(path)
    assert config.token is not None and config.token.get() == "from-file"


def test_kubeconfig_insecure_flag_turns_verification_off(tmp_path: Path) -> None:
    path = write_kubeconfig(
        tmp_path, {"server": "https://k:6443", "insecure-skip-tls-verify": True}, {"token": "t"}
    )
    config = load_kubeconfig(path)
    assert config.ssl_context is not None and config.ssl_context.verify_mode is ssl.CERT_NONE
    assert config.token is not None and config.token.get() == "t"


REFUSED = [
    ("exec plugin", {"exec": {"command": "aws"}}, "users[u].user.exec"),
    ("auth provider", {"auth-provider": {"name": "gcp"}}, "users[u].user.auth-provider"),
    ("basic auth", {"username": "a", "password": "b"}, "users[u].user.username"),
]


@pytest.mark.parametrize(("case", "user", "where"), REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_credentials_are_refused_by_name(
    tmp_path: Path, case: str, user: dict[str, Any], where: str
) -> None:
    path = write_kubeconfig(tmp_path, {"server": "https://k:6443"}, user)
    with pytest.raises(ConfigError) as caught:
        load_kubeconfig(path)
    assert caught.value.issues[0].path == where
    assert caught.value.issues[0].file == str(path)


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    path = write_kubeconfig(
        tmp_path, {"server": "https://k:6443", "certificate-authority": "nope.pem"}, {}
    )
    with pytest.raises(ConfigError, match="cannot load the CA"):
        load_kubeconfig(path)


def test_kubeconfig_path_in_the_runtime_config_is_relative_to_that_file(tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {"identity": {"kubernetes": True, "kubeconfig": "kube/config", "watchJobs": False}},
        file="outgate.yaml",
        base_dir=tmp_path,
    )
    assert settings.kubeconfig == str(tmp_path / "kube/config")
    assert settings.identity_kubernetes and not settings.identity_watch_jobs


# -- in-cluster -------------------------------------------------------------------------------


def test_in_cluster_config_from_the_service_account_mount(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["10.96.0.1"])
    account = tmp_path / "sa"
    account.mkdir()
    (account / "ca.crt").write_bytes(pki.ca_pem.read_bytes())
    (account / "token").write_text("bound-token")
    (account / "namespace").write_text("outgate-system")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    config = in_cluster_config(environ=env, account_dir=account)
    assert config.server == "https://[fd00::1]:443"
    assert config.namespace == "outgate-system"
    assert config.token is not None and config.token.rereadable
    assert config.token.get() == "bound-token"


def test_in_cluster_config_outside_a_pod_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        in_cluster_config(environ={}, account_dir=tmp_path)
    assert "identity.kubeconfig" in caught.value.issues[0].fix


def test_token_file_is_re_read_every_minute_and_on_invalidate(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "token"
    path.write_text("one")
    source = TokenSource(path=path, clock=lambda: now[0])
    assert source.get() == "one"
    path.write_text("two")
    now[0] = 59.0
    assert source.get() == "one"
    now[0] = 60.0
    assert source.get() == "two"
    path.write_text("three")
    source.invalidate()
    assert source.get() == "three"
    path.unlink()  # a failed read keeps the token we had
    source.invalidate()
    assert source.get() == "three"


async def test_the_client_ignores_https_proxy_from_the_environment(
    fake: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that does not exist: honouring it would fail the request.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    client = KubeClient(load_kubeconfig(fake.kubeconfig()))
    try:
        answer = await client.request_json("GET", "/api/v1/pods", params={"limit": "1"})
    finally:
        await client.close()
    assert answer["kind"] == "PodList"
