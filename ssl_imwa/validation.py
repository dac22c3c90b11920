"""Value checks that name the config key and what was expected (types are OmegaConf's job)."""
from __future__ import annotations

import math
from typing import Any


def expect_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}='{value}': expected one of {', '.join(allowed)}")


def expect_range(key: str, value: float, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """`value` finite and within [low, high] (an open end excludes the bound; None: unbounded)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"{key}={value}: expected {_integer_range(low, high, low_open, high_open)}")
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{key}={value}: expected a finite value in {left}, {right}")


def _integer_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The integers in a range, in words: 'an integer >= 1', 'an integer in [0, 4294967295]'."""
    first = None if low is None else math.floor(low) + 1 if low_open else math.ceil(low)
    last = None if high is None else math.ceil(high) - 1 if high_open else math.floor(high)
    if first is not None and last is not None:
        return f"an integer in [{first}, {last}]"
    if first is not None:
        return f"an integer >= {first}"
    return "an integer" if last is None else f"an integer <= {last}"


def expect_positive(key: str, value: float, allow_zero: bool = False) -> None:
    expect_range(key, value, 0, low_open=not allow_zero)


def typed_section(key: str, schema: type, values: Any) -> Any:
    """Config section `key` (a mapping) merged into the dataclass `schema` that types it (a plugin's options):
    an unknown key or a wrong type raises OmegaConf's error, its `full_key` named as the user types it."""
    from dataclasses import fields

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(values, dict) or OmegaConf.is_dict(values):
        refuse_unknown(key, values, [item.name for item in fields(schema)])
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as error:  # merged on its own: the key is relative to the section
        error.full_key = f"{key}.{getattr(error, 'full_key', None) or ''}".rstrip(".")
        raise


def refuse_unknown(section: str, given: Any, known: list[str]) -> None:
    """'unknown key imwa.twa.stps; did you mean imwa.twa.steps?' for the first key of `given` not in `known`
    (plugin option sections are open while Hydra composes: their keys are checked here)."""
    import difflib

    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
            raise ValueError(f"unknown key {section}.{key}; " + (f"did you mean {section}.{close[0]}?" if close
                                                                 else f"{section} has {', '.join(known)}"))
