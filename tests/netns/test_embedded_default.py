"""The embedded default config fits a laptop (issue 14, defect 9): started with no --config under
the descriptor limits laptops ship with, it logs no `file_descriptor_limit_low`.

In the network namespace because the embedded default listens on its fixed ports (3128, 9090).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.proxyproc import ProxyProcess

# Soft and hard at once, so the proxy cannot raise its way out: Linux's default soft limit
# (`ulimit -n` is 1024 on most distributions) and macOS's (256).
LAPTOP_LIMITS = [1024, 256]


@pytest.mark.parametrize("limit", LAPTOP_LIMITS)
def test_the_embedded_default_starts_without_a_descriptor_warning_on_a_laptop_limit(
    tmp_path: Path, limit: int
) -> None:
    with ProxyProcess(tmp_path, policies="", embedded_config=True, rlimit_nofile=limit) as proxy:
        assert proxy.port == 3128  # the embedded default, not a test config
        warnings = [e for e in proxy.logs if e.get("event") == "file_descriptor_limit_low"]
    assert warnings == []
