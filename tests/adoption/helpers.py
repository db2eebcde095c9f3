"""Helpers of the adoption tests: where the Squid configurations live, and line lookup."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def line_of(path: Path, text: str, *, whole: bool = False) -> int:
    """The 1-based number of the only line of `path` containing `text` (or equal to it)."""
    numbers = [
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (line.split("#")[0].strip() == text if whole else text in line)
    ]
    assert len(numbers) == 1, f"{text!r} is on lines {numbers} of {path}"
    return numbers[0]
