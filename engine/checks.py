"""Early, one-line input checks shared by every primitive.

Bad input must fail here, naming the input and what was expected, never as a silent NaN or a
deep XLA trace. The checks run on host values (numpy) or on concrete jax arrays; they are not
meant to be called inside `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class InputError(ValueError):
    """Bad input to an engine primitive (one-line message naming the input)."""


def check_finite(name: str, x) -> None:
    """Raises `InputError` when ``x`` holds NaN or Inf, with the count and first index."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.inexact):
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"{name}: {int(bad.sum())} non-finite value(s) (NaN/Inf), first at "
            f"index {first}; expected finite numbers"
        )


def check_rank(name: str, x, ndim: int) -> None:
    """Raises when ``x`` does not have ``ndim`` dimensions."""
    shape = np.shape(x)
    if len(shape) != ndim:
        raise InputError(f"{name}: expected a {ndim}-D array, got shape {tuple(shape)}")


def check_shape(name: str, x, expected: Sequence[int | None]) -> None:
    """Raises when ``x.shape`` does not match ``expected`` (None matches any size)."""
    shape = tuple(np.shape(x))
    if len(shape) != len(expected) or any(
        e is not None and e != s for s, e in zip(shape, expected)
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InputError(f"{name}: expected shape {want}, got {shape}")


def check_rows_match(name_a: str, a, name_b: str, b) -> None:
    """Raises when two row-aligned arrays have different row counts."""
    na, nb = np.shape(a)[0], np.shape(b)[0]
    if na != nb:
        raise InputError(
            f"{name_a} has {na} rows but {name_b} has {nb}; the two must be "
            f"row-aligned (same tokens / same pairs)"
        )


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Returns ``int(value)`` or raises when it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_non_negative(name: str, value) -> None:
    """Raises when any entry of ``value`` is negative (or NaN)."""
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(arr >= 0):
        raise InputError(f"{name} must be >= 0, got {value!r}")


def as_float_matrix(name: str, x, min_rows: int = 1, *, finite: bool = True) -> np.ndarray:
    """Validates a 2-D float array with at least ``min_rows`` rows, returns numpy.

    ``finite=False`` skips the NaN/Inf scan, for callers that detect non-finite values in a
    pass they make anyway (e.g. row norms, see `check_finite_rows`).
    """
    arr = np.asarray(x)
    check_rank(name, arr, 2)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name}: expected a float array, got dtype {arr.dtype}")
    if arr.shape[0] < min_rows:
        raise InputError(f"{name}: expected at least {min_rows} rows, got {arr.shape[0]}")
    if finite:
        check_finite(name, arr)
    return arr


def check_finite_rows(name: str, x, row_values) -> None:
    """Raises `InputError` for NaN/Inf in ``x`` given per-row reductions of it.

    ``row_values`` is any per-row quantity that is non-finite whenever the row holds NaN or Inf
    (a float64 norm or sum): only rows where it is non-finite are scanned, so a caller that
    computes it anyway pays no separate full pass. A non-finite reduction of a finite row
    (float64 overflow) is reported as such.
    """
    bad = np.flatnonzero(~np.isfinite(np.asarray(row_values)))
    if not bad.size:
        return
    rows = np.asarray(x[bad])
    nonfinite = ~np.isfinite(rows)
    if nonfinite.any():
        r, c = np.argwhere(nonfinite)[0]
        raise InputError(
            f"{name}: {int(nonfinite.sum())} non-finite value(s) (NaN/Inf), first at "
            f"index {(int(bad[r]), int(c))}; expected finite numbers"
        )
    raise InputError(
        f"{name}: row {int(bad[0])} overflows float64 (norm or sum is infinite); rescale the input"
    )
