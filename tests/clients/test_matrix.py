"""The real-client matrix: each client, through its standard proxy settings, for plain and TLS
GET and POST, a denied destination, and WebSocket over ws:// and wss:// (docs/clients.md).

A client that is not installed here is skipped with its name in the reason; a case a client
cannot do at all (Go's standard library has no WebSocket) is skipped as not applicable.
"""

from __future__ import annotations

import pytest

from tests.clients.clients import CLIENTS, Client, ClientFailed, proxy_environment
from tests.support.clientrange import ALLOWED, DENIED, DENY_REASON, DENY_RULE, ClientRange
from tests.support.clients import curl

# Several kilobytes of text with multi-byte characters, so a body cut short, re-encoded or
# re-framed on the way shows.
BODY = "".join(f"line {n:04d}: egress through Outgate \u2713 \u00e9\u00e8\n" for n in range(300))

clients = pytest.mark.parametrize("client", CLIENTS, ids=lambda client: client.name)


def usable(client: Client, capability: str) -> None:
    """Skip, naming the client, where it is not installed or cannot do `capability` at all."""
    missing = client.missing()
    if missing is not None:
        pytest.skip(missing)
    if not getattr(client, capability):
        pytest.skip(f"{client.name}: not applicable: {client.not_applicable[capability]}")


@clients
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_get_reaches_the_allowed_origin(
    client: Client, scheme: str, client_range: ClientRange
) -> None:
    usable(client, "http")
    reply = await client.request(client_range, "GET", f"{scheme}://{ALLOWED}/hello")
    assert (reply.status, reply.body) == (200, "hello from origin\n")


@clients
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_post_body_arrives_at_the_origin_intact(
    client: Client, scheme: str, client_range: ClientRange
) -> None:
    usable(client, "http")
    origin = client_range.http_origin if scheme == "http" else client_range.https_origin
    seen_before = len(origin.seen)
    reply = await client.request(client_range, "POST", f"{scheme}://{ALLOWED}/echo", BODY)
    assert reply.status == 200
    assert reply.body == BODY
    received = [seen for seen in origin.seen[seen_before:] if seen.path == "/echo"]
    assert [(seen.method, seen.body_bytes) for seen in received] == [("POST", len(BODY.encode()))]


@clients
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_denied_destination_shows_the_refusal_and_its_reason(
    client: Client, scheme: str, client_range: ClientRange
) -> None:
    """A refused CONNECT reaches the client as an error: its message must carry what the client
    can show (the status, and the reason where the client prints the reason phrase). A refused
    plain request is a 403 response whose reason phrase, header and body name the reason."""
    if client.http:
        usable(client, "http")
        attempt = client.request(client_range, "GET", f"{scheme}://{DENIED}/hello")
    else:
        usable(client, "websocket")
        ws_scheme = "ws" if scheme == "http" else "wss"
        attempt = client.echo(client_range, f"{ws_scheme}://{DENIED}/ws-echo", "must not arrive")
    before = client_range.recorded_ids()
    if scheme == "https" or client.tunnels_plain_http:
        with pytest.raises(ClientFailed) as failed:
            await attempt
        shown = str(failed.value)
        reply = None
    else:
        reply = await attempt
    assert client_range.deny_recorded(before)["rule"]["name"] == DENY_RULE
    assert client_range.origin_requests(DENIED) == []
    if reply is None:
        for text in client.tunnel_refusal_shows:
            assert text in shown, f"{client.name} shows: {shown}"
        return
    assert reply.status == 403
    assert reply.headers["x-outgate-reason"] == DENY_REASON
    assert f"reason: {DENY_REASON}" in reply.body
    if reply.reason is not None:
        assert DENY_REASON in reply.reason, f"status line reason phrase: {reply.reason!r}"


@clients
@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_websocket_echoes_through_the_proxy(
    client: Client, scheme: str, client_range: ClientRange
) -> None:
    usable(client, "websocket")
    message = f"hello over {scheme} from {client.name}"
    assert await client.echo(client_range, f"{scheme}://{ALLOWED}/ws-echo", message) == message


def test_curl_verbose_shows_the_refusal_reason_in_the_status_line(
    client_range: ClientRange,
) -> None:
    """curl prints only `CONNECT tunnel failed, response 403`; `-v` shows the proxy's status
    line, which is where the reason must be (DESIGN section 6)."""
    env = {**proxy_environment(client_range), "CURL_CA_BUNDLE": str(client_range.pki.ca_pem)}
    result = curl("-v", f"https://{DENIED}/", env=env)
    assert result.returncode == 56, result.stderr
    assert "CONNECT tunnel failed, response 403" in result.stderr
    status_lines = [line for line in result.stderr.splitlines() if line.startswith("< HTTP/")]
    assert status_lines, result.stderr
    assert DENY_REASON in status_lines[0], status_lines[0]
