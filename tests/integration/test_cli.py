"""The command line as an operator uses it: check-config, explain, --version."""

from __future__ import annotations

from pathlib import Path

from proxy import __version__, native
from tests.support.fixtures import ORIGIN_PORTS, policy_allowing
from tests.support.proxyproc import run_outgate as outgate

REPO = Path(__file__).resolve().parents[2]


def test_version_prints_the_package_version_and_the_build() -> None:
    result = outgate("--version")
    assert result.returncode == 0
    build = native.status()
    said = "compiled" if build.compiled else f"pure Python: {build.reason}"
    assert result.stdout.strip() == f"outgate {__version__} ({said})"


def test_check_config_accepts_the_shipped_config_and_policies() -> None:
    result = outgate("check-config", str(REPO / "config" / "outgate.yaml"))
    assert result.returncode == 0, result.stderr
    assert "config valid" in result.stdout
    result = outgate("check-config", str(REPO / "config" / "policies"))
    assert result.returncode == 0, result.stderr


def test_check_config_on_a_broken_policy_names_file_field_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        policy_allowing("origin.test")
        + "---\n"
        + policy_allowing("*", name="second").replace("127.0.0.0/8", "10.0.0.1/8")
    )
    result = outgate("check-config", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 2, result.stderr
    assert all(str(bad) in line and "(document 2)" in line and "fix:" in line for line in lines)
    assert any("spec.rules[0].to[0].fqdn" in line for line in lines)
    assert any("spec.rules[0].to[1].cidr" in line and "10.0.0.0/8" in line for line in lines)


def test_check_config_on_a_config_with_an_unknown_key_suggests_the_right_one(
    tmp_path: Path,
) -> None:
    config = tmp_path / "outgate.yaml"
    config.write_text("listen: 127.0.0.1:3128\ntimeouts: {conect: 5s}\n")
    result = outgate("check-config", str(config))
    assert result.returncode == 1
    assert "timeouts.conect" in result.stderr
    assert "did you mean 'connect'?" in result.stderr


def test_check_config_reports_the_config_and_the_policies_it_names_every_problem_once(
    tmp_path: Path,
) -> None:
    """Issue 14, defect 5: a config error does not stop the named policies from being checked,
    and `ports: [{port: 70000}]` is one error at `.port`, not also one at an unwritten endPort."""
    (tmp_path / "p.yaml").write_text(
        policy_allowing("origin.test").replace(ORIGIN_PORTS, "[{port: 70000}]")
    )
    config = tmp_path / "outgate.yaml"
    config.write_text("policies: {paths: [p.yaml]}\ntimeouts: {conect: 5s}\n")
    result = outgate("check-config", str(config))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert f"{config}: timeouts.conect:" in lines[0]
    assert "spec.rules[0].ports[0].port: 70000 is not a port" in lines[1]
    assert "endPort" not in result.stderr
    assert result.stdout == ""


def test_explain_prints_the_deciding_steps(tmp_path: Path) -> None:
    config = tmp_path / "outgate.yaml"
    (tmp_path / "p.yaml").write_text(
        policy_allowing("api.example.com")
        + """---
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: guardrails}
spec:
  tier: admin
  priority: 5
  rules:
    - name: no-paste
      action: Deny
      to: [{fqdn: "*.pastebin.com"}]
"""
    )
    config.write_text(
        "policies: {paths: [p.yaml]}\n"
        "identity:\n  static:\n"
        "    - {name: test-client, namespace: tests, cidrs: [10.1.2.3/32], labels: {app: client}}\n"
    )
    allowed = outgate(
        "explain",
        "--config",
        str(config),
        "--source",
        "10.1.2.3",
        "--url",
        "https://api.example.com/",
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "tests/Static/test-client" in allowed.stdout
    assert "allow-origins" in allowed.stdout
    assert "allow" in allowed.stdout.lower()
    denied = outgate(
        "explain",
        "--config",
        str(config),
        "--source",
        "10.1.2.3",
        "--url",
        "https://x.pastebin.com/",
    )
    assert denied.returncode == 0, denied.stderr
    assert "guardrails" in denied.stdout and "no-paste" in denied.stdout
    assert "deny" in denied.stdout.lower()


def test_explain_names_the_deciding_rule_once_and_a_tunnel_protocol_only_for_tunnels(
    tmp_path: Path,
) -> None:
    """Issue 14, defect 6: `protocol tls` is what a CONNECT tunnel is held to; a plain http://
    request is forwarded, never held to it, so its explanation does not claim it."""
    config = tmp_path / "outgate.yaml"
    (tmp_path / "p.yaml").write_text(
        policy_allowing("api.example.com").replace("ports: ", "protocol: tls\n      ports: ")
    )
    config.write_text(
        "policies: {paths: [p.yaml]}\n"
        "identity:\n  static:\n"
        "    - {name: test-client, namespace: tests, cidrs: [10.1.2.3/32], labels: {app: client}}\n"
    )

    def explain_url(url: str) -> str:
        result = outgate("explain", "--config", str(config), "--source", "10.1.2.3", "--url", url)
        assert result.returncode == 0, result.stderr
        return result.stdout

    plain = explain_url("http://api.example.com/")
    assert "connection:  forward (plain HTTP)" in plain
    assert "protocol" not in plain
    tunnelled = explain_url("https://api.example.com/")
    assert "connection:  tunnel (CONNECT)" in tunnelled
    assert "protocol tls" in tunnelled
    for text in (plain, tunnelled):
        steps = [line for line in text.splitlines() if "rule allow-origins" in line]
        assert len(steps) == 2, text  # one step, and the decision line
        assert steps[0].endswith("rule allow-origins: Allow -> allow")
