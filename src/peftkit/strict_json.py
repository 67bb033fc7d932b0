"""Strict JSON out: what ``--json`` prints and peftkit's JSON lines hold, readable by any JSON parser.

``json.dumps`` writes ``NaN`` and ``Infinity`` by default, which are not JSON (RFC 8259) and which strict parsers
(JavaScript's ``JSON.parse``, ``jq``) reject. Here a non-finite float becomes ``null`` (the value is unknown), and
``allow_nan=False`` makes any one that slipped through an error instead of invalid output.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-Infinity), at any depth of dicts, lists and tuples, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def non_finite_keys(scores: dict[str, Any]) -> list[str]:
    """The keys of ``scores`` whose values are non-finite floats."""
    return [k for k, v in scores.items() if isinstance(v, float) and not math.isfinite(v)]


def dumps(value: Any) -> str:
    """One line of strict JSON: non-finite floats as null."""
    return json.dumps(finite_or_none(value), allow_nan=False)
