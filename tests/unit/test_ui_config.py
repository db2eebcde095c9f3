"""The admin page's settings (issue 15: `ui`, `traffic`): defaults, and every mistake reported
with its field path and fix; the token file is read at start and a bad one stops it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    DEFAULT_MAX_WORKLOADS,
    DEFAULT_METRIC_DESTINATIONS,
    DEFAULT_TOP_DESTINATIONS,
    Settings,
    settings_from_mapping,
)
from proxy.errors import ConfigError
from proxy.ui import load_token


def load(raw: dict[str, Any], base: Path = Path("/etc/outgate")) -> Settings:
    return settings_from_mapping(raw, file="outgate.yaml", base_dir=base)


def issues(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load(raw)
    return [(issue.path, f"{issue.message} -- {issue.fix}") for issue in caught.value.issues]


def test_defaults_serve_the_page_without_a_token_and_bound_the_aggregate() -> None:
    settings = load({})
    assert settings.ui_enabled is True and settings.ui_token_file is None
    assert settings.traffic_top_destinations == DEFAULT_TOP_DESTINATIONS == 50
    assert settings.traffic_max_workloads == DEFAULT_MAX_WORKLOADS == 100
    assert settings.traffic_metric_destinations == DEFAULT_METRIC_DESTINATIONS == 10


def test_settings_are_read_and_a_relative_token_file_is_relative_to_the_config() -> None:
    settings = load(
        {
            "ui": {"enabled": False, "tokenFile": "secrets/ui-token"},
            "traffic": {"topDestinations": 5, "maxWorkloads": 7, "metricDestinations": 0},
        }
    )
    assert settings.ui_enabled is False
    assert settings.ui_token_file == "/etc/outgate/secrets/ui-token"
    assert (
        settings.traffic_top_destinations,
        settings.traffic_max_workloads,
        settings.traffic_metric_destinations,
    ) == (5, 7, 0)


@pytest.mark.parametrize(
    ("raw", "path", "fix"),
    [
        ({"ui": {"enabled": "yes"}}, "ui.enabled", "true or false"),
        ({"ui": {"tokenFile": ""}}, "ui.tokenFile", "a path to a file holding the bearer token"),
        ({"ui": {"tokenFile": 12}}, "ui.tokenFile", "a path to a file holding the bearer token"),
        ({"ui": {"token": "x"}}, "ui.token", "did you mean 'tokenFile'?"),
        ({"traffic": {"topDestinations": 0}}, "traffic.topDestinations", "a count, e.g. 50"),
        ({"traffic": {"maxWorkloads": -1}}, "traffic.maxWorkloads", "a count, e.g. 100"),
        ({"traffic": {"metricDestinations": 1.5}}, "traffic.metricDestinations", "a count"),
        ({"traffic": {"top": 5}}, "traffic.top", "known keys: topDestinations"),
    ],
)
def test_each_mistake_names_its_field_and_the_fix(raw: dict[str, Any], path: str, fix: str) -> None:
    (found,) = issues(raw)
    assert found[0] == path
    assert fix in found[1]


def test_the_token_is_read_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  s3cret\n")
    assert load_token(load({"ui": {"tokenFile": "token"}}, tmp_path)) == "s3cret"
    assert load_token(load({})) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read: No such file or directory"),
        (b"\n", "is empty"),
        (b"\xff\xfe", "is not ASCII"),
        (b"x" * 5000, "is longer than 4096 bytes"),
    ],
)
def test_a_token_file_that_cannot_serve_stops_the_start(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "token").write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_token(load({"ui": {"tokenFile": "token"}}, tmp_path))
    (issue,) = caught.value.issues
    assert issue.path == "ui.tokenFile"
    assert message in issue.message
    assert "remove ui.tokenFile" in issue.fix
