"""A real headless browser (Debian's `chromium`) loading a page: the DOM after it loaded, and a
screenshot. Used by the admin page tests (issue 15), inside the network namespace: a browser
has background traffic of its own, which must reach nothing real.

`--dump-dom` prints the document as the browser holds it once loaded, after any script ran:
a test that finds no injected element there shows that no script from the page changed it.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

# A cold start of Chromium on a loaded two-core machine takes a few seconds.
BROWSER_TIMEOUT = 60.0
# Screenshots are copied here for a person to look at after a run (docs/ui.md).
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "ui"


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is missing: run `make install-test` (Debian package chromium)")
    return found


def _run(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile.mkdir(parents=True, exist_ok=True)
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-proxy-server",  # the page is fetched directly, never through the proxy under test
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def dump_dom(url: str, profile: Path) -> str:
    """The document as the browser holds it after loading `url`."""
    return _run(profile, "--dump-dom", url).stdout


def screenshot(url: str, path: Path, profile: Path, *, size: str = "1280,1500") -> Path:
    """A PNG of `url` at `size` (width,height) in `path`, also copied to ARTIFACTS."""
    _run(profile, f"--screenshot={path}", f"--window-size={size}", "--hide-scrollbars", url)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the browser wrote no PNG"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / path.name)
    return path


class Dom(HTMLParser):
    """The parts of a dumped DOM the tests read: text by element id, table rows by table id,
    and every element seen (to find what must not be there)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text_by_id: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._open_ids: list[tuple[str, str]] = []  # (tag, id) whose text is being collected
        self._depth: dict[str, int] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        element_id = attributes.get("id")
        if element_id:
            self._open_ids.append((tag, element_id))
            self.text_by_id[element_id] = ""
        if tag == "table" and element_id:
            self._table = element_id
            self.tables[element_id] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        if self._open_ids and self._open_ids[-1][0] == tag:
            self._open_ids.pop()

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open_ids:
            self.text_by_id[element_id] += data
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id: str) -> list[list[str]]:
        """The table's rows below its header row."""
        return self.tables[table_id][1:]

    def has(self, tag: str) -> bool:
        return any(name == tag for name, _ in self.tags)
