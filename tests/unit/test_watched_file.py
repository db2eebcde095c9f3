"""A watched file (proxy.control.watched_file): the last good content stays when a read fails."""

from __future__ import annotations

from pathlib import Path

from proxy.control.watched_file import FileLoadError, WatchedFile


def _load(text: str) -> str:
    if "bad" in text:
        raise FileLoadError("the word bad is not allowed")
    return text


def watched(path: Path, *, missing_ok: bool = True) -> WatchedFile[str]:
    return WatchedFile(
        path, load=_load, empty="", event="test_file", max_bytes=16, missing_ok=missing_ok
    )


def test_a_bad_or_oversized_file_keeps_the_last_good_content(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("good")
    file = watched(path)
    assert file.reload() and file.current == "good" and file.last_error is None
    path.write_text("bad")
    assert not file.reload()
    assert (file.current, file.last_error) == ("good", "the word bad is not allowed")
    path.write_text("x" * 17)
    assert not file.reload()
    assert file.current == "good" and "larger than 16 bytes" in str(file.last_error)
    path.write_text("better")
    assert file.reload() and file.current == "better" and file.last_error is None


def test_changes_are_seen_by_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("one")
    file = watched(path)
    assert file.changed()  # never read yet
    file.reload()
    assert not file.changed()
    staged = tmp_path / "staged"
    staged.write_text("two")
    staged.rename(path)  # a new inode, as a ConfigMap or Secret update makes
    assert file.changed()


def test_a_missing_file_is_empty_when_allowed_and_an_error_otherwise(tmp_path: Path) -> None:
    optional = watched(tmp_path / "absent")
    assert not optional.reload()
    assert optional.current == "" and optional.last_error is None
    required = watched(tmp_path / "absent", missing_ok=False)
    assert not required.reload()
    assert required.last_error == "the file does not exist"
