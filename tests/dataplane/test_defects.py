"""A defect inside the proxy while a request is decided (an exception that is not one of its
refusals) fails closed and keeps the audit promise: the client gets 500 `internal_error`, the
exchange gets its decision and close records, the log names the event, and the next request is
served. The defect is injected where a real one could sit: the resolver the Router calls."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.fixtures import policy_allowing
from tests.support.inprocess import closes, exchange_on_new_connection, inprocess_proxy
from tests.support.origin import OriginServer

LOOPBACK = (ipaddress.ip_address("127.0.0.1"),)


def request(method: str, target: str, host: str) -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(
            lambda port: request("GET", f"http://broken.test:{port}/", f"broken.test:{port}"),
            id="forward",
        ),
        pytest.param(
            lambda port: request("CONNECT", f"broken.test:{port}", f"broken.test:{port}"),
            id="connect",
        ),
    ],
)
async def test_a_defect_while_deciding_is_refused_500_with_both_records_and_logged(
    tmp_path: Path,
    origin: OriginServer,
    send: Callable[[int], bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    policies = policy_allowing("origin.test", "broken.test")
    answers = {"origin.test": LOOPBACK, "broken.test": RuntimeError("a defect")}
    async with inprocess_proxy(tmp_path, policies, answers=answers) as proxy:
        status, headers, body, closed = await exchange_on_new_connection(
            proxy, send(origin.port), then_closed=True
        )
        assert status == 500
        assert headers.get("x-outgate-reason") == "internal_error"
        assert closed, "a connection that met a defect is not kept"
        close = (await proxy.audit.wait_for(closes))[0]
        event_id = close["event"]["id"]
        actions = sorted(
            r["event"]["action"] for r in proxy.audit.records if r["event"]["id"] == event_id
        )
        assert actions == ["close", "decision"]
        assert close["outgate"]["reason"] == "internal_error"
        assert event_id.encode() in body
        logged = capsys.readouterr()
        assert (
            "exchange_failed" in logged.err + logged.out
            and "RuntimeError" in logged.err + logged.out
        )

        served, _, _, _ = await exchange_on_new_connection(
            proxy, request("GET", f"http://origin.test:{origin.port}/hello", "origin.test")
        )
        assert served == 200
