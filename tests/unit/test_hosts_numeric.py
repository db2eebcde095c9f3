"""A host whose IDNA form is numeric is neither a name nor a canonical literal."""

from __future__ import annotations

import pytest

from proxy.core.hosts import parse_host
from proxy.errors import BadRequest


@pytest.mark.parametrize("raw", ["\u00b9", "\uff11\uff12\uff17.\uff10.\uff10.\uff11", "a.\uff10"])
def test_unicode_digits_normalising_to_a_number_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest, match="numeric form"):
        parse_host(raw)


def test_a_name_with_a_numeric_label_inside_is_still_a_name() -> None:
    assert parse_host("v1.api.example").name == "v1.api.example"
