"""Frozen, slotted dataclass values built at the cost of a plain object, for the hot path.

A frozen dataclass's `__init__` sets every field through `object.__setattr__` (the class's own
`__setattr__` refuses), a generic call that costs about 1,700 instructions a field on CPython
3.11: 24,000 of the 95,000 a 14-field `RequestHead` parse took (bench/README.md, issue 16).
`maker(cls)` returns a function that takes the same keyword arguments as `cls(...)` and returns
the same value for about a fifth of that. It fills an instance of a plain twin class that has
`cls`'s slots (one ordinary attribute store a field), then makes it a `cls` by assigning
`__class__`, which Python allows between classes of the same layout (same slots, same base). The
value is one `cls(...)` would have given: the same type, slots and fields, equal, hashable,
frozen from then on.

A class mypyc compiled (a native class, proxy/native.py) cannot change `__class__` and needs no
twin: its own `__init__` stores each field directly, so `maker` returns the class itself.

Not for a class mypyc compiled (proxy/native.py): `__class__` cannot be assigned to a native
class, and its dataclass `__init__` stays interpreted, so the compiled modules build their values
from classes defined in proxy/core/values.py, which is not compiled.

Only for classes where that is all `__init__` does: `maker` refuses a class that is not a frozen,
slotted dataclass, or has a default factory, an `init=False` field, an `InitVar` or a
`__post_init__` (plain defaults are kept). Field names are the class's own identifiers; no
caller's data reaches the generated source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def maker(cls: type[T]) -> Callable[..., T]:
    """A keyword-only constructor equivalent to `cls(...)` for a frozen, slotted dataclass."""
    params = getattr(cls, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(cls) or params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    if hasattr(cls, "__mypyc_attrs__"):
        return cls  # compiled (proxy/native.py): its native __init__ stores fields directly
    if hasattr(cls, "__mypyc_attrs__"):
        # A native class cannot change __class__, and its dataclass __init__ stays interpreted,
        # one object.__setattr__ a field: keep such values out of the compiled modules.
        raise TypeError(f"{cls.__name__} is compiled by mypyc; define it in proxy.core.values")
    slots = cls.__dict__.get("__slots__")
    if slots is None or cls.__bases__ != (object,):
        raise TypeError(f"{cls.__name__} is not a slotted dataclass on object")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which maker() would skip")
    fields = dataclasses.fields(cls)
    names = [field.name for field in fields]
    if tuple(names) != tuple(slots):
        raise TypeError(f"{cls.__name__} has slots beyond its fields (an InitVar?)")
    namespace: dict[str, Any] = {"cls": cls}
    parameters = []
    for field in fields:
        if field.default_factory is not dataclasses.MISSING or not field.init:
            raise TypeError(f"{cls.__name__}.{field.name}: a default factory or init=False")
        if field.default is dataclasses.MISSING:
            parameters.append(field.name)
        else:
            namespace[f"default_{field.name}"] = field.default
            parameters.append(f"{field.name}=default_{field.name}")
    namespace["twin"] = type(f"_{cls.__name__}Fields", (), {"__slots__": tuple(slots)})
    lines = [f"def make(*, {', '.join(parameters)}):", "    value = twin()"]
    lines += [f"    value.{name} = {name}" for name in names]
    lines += ["    value.__class__ = cls", "    return value"]
    exec("\n".join(lines), namespace)  # noqa: S102 - source from the class's own field names
    make: Callable[..., T] = namespace["make"]
    make.__qualname__ = f"maker({cls.__name__})"
    make.__doc__ = f"{cls.__name__}(...), built without object.__setattr__ (proxy.core.frozen)."
    return make
