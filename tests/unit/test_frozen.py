"""proxy.core.frozen: a value built by maker(cls) is the value cls(...) builds, and classes it
cannot build that way are refused."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.core.frozen import maker


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Point:
    x: int
    y: int
    label: str = "origin"


def test_a_made_value_is_the_value_the_class_builds() -> None:
    made = maker(Point)(x=1, y=2)
    assert type(made) is Point
    assert made == Point(x=1, y=2)
    assert hash(made) == hash(Point(x=1, y=2))
    assert repr(made) == "Point(x=1, y=2, label='origin')"
    assert dataclasses.replace(made, label="moved") == Point(x=1, y=2, label="moved")


def test_a_made_value_is_frozen() -> None:
    made = maker(Point)(x=1, y=2, label="a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.x = 3  # type: ignore[misc]


def test_every_field_without_a_default_must_be_passed_by_name() -> None:
    make = maker(Point)
    with pytest.raises(TypeError):
        make(x=1)
    with pytest.raises(TypeError):
        make(1, 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoSlots:
    x: int


@dataclasses.dataclass(slots=True, kw_only=True)
class NotFrozen:
    x: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Checked:
    x: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("negative")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Factory:
    xs: list[int] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize("cls", [NoSlots, NotFrozen, Checked, Factory, int])
def test_classes_whose_init_does_more_are_refused(cls: type) -> None:
    with pytest.raises(TypeError):
        maker(cls)
