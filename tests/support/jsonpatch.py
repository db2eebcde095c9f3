"""Apply an RFC 6902 JSON Patch (the `add` and `replace` operations an admission webhook sends)
to a copy of a JSON document, as the API server does, so tests check the patched pod, not the
operations' wording."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any


def apply_patch(document: Any, patch: Iterable[Mapping[str, Any]]) -> Any:
    result = copy.deepcopy(document)
    for op in patch:
        if op["op"] not in ("add", "replace"):
            raise ValueError(f"unexpected operation {op['op']}")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent = result
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            elif op["op"] == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            if op["op"] == "replace" and last not in parent:
                raise KeyError(f"replace of a missing member {op['path']}")
            parent[last] = value
    return result
