"""Per-request sampler and scoring options: their specs and the one function that checks a
request's values against them. Pure Python (no torch, no numpy), so that the models, the
replicas and the gateway all validate with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.core.errors import InvalidArgument

MAX_OPTIONS = 64  # entries in one request's options map, checked before any is looked at


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never echo a huge input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


@dataclass(frozen=True)
class OptionSpec:
    """One per-request sampler/scoring option, with its type, default and bounds.

    ``cost``: the option multiplies the work of a request (solver steps, importance
    samples): the request's compute budget counts ``examples * value`` for it.
    """

    kind: Literal["int", "float", "str", "bool"]
    default: int | float | str | bool
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    cost: bool = False

    def check(self, name: str, value: Any) -> int | float | str | bool:
        """Return ``value`` converted to this option's type, or raise InvalidArgument.

        NaN, infinities, non-integral values for ints, wrong types and values outside
        ``[min, max]`` or ``choices`` are rejected with a message naming ``name``.
        """
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidArgument(name, f"expected true or false, got {show(value)}")
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise InvalidArgument(name, f"must be one of {list(self.choices)}, got {show(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(name, f"expected a number, got {show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(name, f"must be finite, got {value!r}")
        lo = -math.inf if self.min is None else self.min
        hi = math.inf if self.max is None else self.max
        if not lo <= value <= hi:
            raise InvalidArgument(name, f"must be in [{self.min}, {self.max}], got {show(value)}")
        if self.kind == "int":
            if value != int(value):
                raise InvalidArgument(name, f"expected an integer, got {value!r}")
            return int(value)
        return float(value)


def resolve_options(specs: Mapping[str, OptionSpec], options: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Validate ``options`` against ``specs`` and fill in defaults.

    Raises:
        InvalidArgument: too many entries, an unknown option, a value of the wrong type or
            out of range.
    """
    if len(options) > MAX_OPTIONS:
        raise InvalidArgument("options", f"at most {MAX_OPTIONS} entries, got {len(options)}")
    unknown = sorted(set(options) - set(specs))
    if unknown:
        allowed = sorted(specs) or "none"
        name = unknown[0] if len(unknown[0]) <= 60 else f"{unknown[0][:60]}..."
        raise InvalidArgument(f"options.{name}", f"unknown option; allowed: {allowed}")
    return {
        name: spec.check(f"options.{name}", options[name]) if name in options else spec.default
        for name, spec in specs.items()
    }


def work_factor(specs: Mapping[str, OptionSpec], resolved: Mapping[str, Any]) -> int:
    """The product of the resolved values of the options that multiply work (>= 1)."""
    factor = 1
    for name, spec in specs.items():
        if spec.cost and spec.kind in ("int", "float"):
            factor *= max(1, math.ceil(float(resolved[name])))
    return factor
