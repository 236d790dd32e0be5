"""Reference tests in one style: a function against an independent reference over cases."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest


def assert_matches_reference(
    fn: Callable[..., float],
    reference_fn: Callable[..., float],
    cases: Iterable[tuple],
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """fn(*case) equals reference_fn(*case) within rtol and atol (exactly with both 0) for every
    case; a mismatch names the function, the case and both values."""
    for case in cases:
        got, expected = fn(*case), reference_fn(*case)
        assert got == pytest.approx(expected, rel=rtol, abs=atol), (
            f"{fn.__name__}{case} = {got!r}, reference {reference_fn.__name__} = {expected!r}"
        )
