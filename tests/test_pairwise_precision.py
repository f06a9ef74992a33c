"""Reduced-precision matmuls in `engine.pairwise`: the error bound the refinement relies on,
and exactness of the refined result from TF32 / bf16 candidates (emulated on the CPU).

The accelerator defaults (GPU: TF32, TPU: bf16_3x) are only safe because
`cosine_tolerance(d, precision, platform)` bounds the error of the rounded-input GEMM; these
tests check that bound against float64 on inputs rounded by an independent implementation
(``ml_dtypes.bfloat16`` casts; TF32 by ``frexp`` rounding), and that `_refine` then returns
exactly the float64 argmax.
"""

import ml_dtypes
import numpy as np
import pytest

from engine import checks, pairwise
from experiments import bench_precision


def _tf32(x: np.ndarray) -> np.ndarray:
    """Round to a 10-bit mantissa (11 significant bits), half to even, via frexp."""
    m, e = np.frexp(x.astype(np.float64))
    return (np.round(m * 2.0**11) / 2.0**11 * 2.0**e).astype(np.float32)


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


ROUND = {"tf32": _tf32, "bf16": _bf16}


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_bench_rounding_matches_independent_rounding():
    x = np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 3
    for fmt, ref in ROUND.items():
        np.testing.assert_array_equal(bench_precision.round_mantissa(x, fmt), ref(x))


@pytest.mark.parametrize("fmt", ["tf32", "bf16"])
def test_rounded_gemm_error_within_bound(fmt):
    rng = np.random.default_rng(1)
    d = 1024
    a, b = _unit(rng, 256, d), _unit(rng, 384, d)
    b[:64] = a[:64] + 0.05 * b[:64]  # some large cosines too
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    got = ROUND[fmt](a) @ ROUND[fmt](b).T
    err = np.max(np.abs(got - ref))
    tol = pairwise.cosine_tolerance(d, fmt)
    assert err <= tol
    # the bound is not vacuous: below a cosine gap that decides argmaxes
    assert tol < 0.01
    err32 = np.max(np.abs(a @ b.T - ref))
    assert err > 10 * err32  # the rounding did matter


@pytest.mark.parametrize("fmt", ["tf32", "bf16"])
def test_refinement_from_low_precision_candidates_is_exact(fmt):
    rng = np.random.default_rng(2)
    n, d, k, margin = 512, 256, 1, 4
    a = rng.standard_normal((n, d)).astype(np.float32)
    # B: near-duplicate partners (gaps of ~1e-3 between the top candidates: many rows are
    # within the bf16 bound and must be recomputed in full) plus noise rows.
    b = np.repeat(a[: n // 4], 4, axis=0) + 0.02 * rng.standard_normal((n, d)).astype(np.float32)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    s = ROUND[fmt](a / na[:, None]) @ ROUND[fmt](b / nb[:, None]).T
    kk = k + margin
    idx = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    vals = np.take_along_axis(s, idx, axis=1)
    tol = pairwise.cosine_tolerance(d, fmt)
    out_v, out_i, fallback = pairwise._refine(a, na, b, nb, vals, idx.astype(np.int32), k, tol)
    ref = (a.astype(np.float64) / na[:, None]) @ (b.astype(np.float64) / nb[:, None]).T
    np.testing.assert_array_equal(out_i[:, 0], ref.argmax(1))
    np.testing.assert_allclose(out_v[:, 0], ref.max(1), rtol=0, atol=1e-12)
    if fmt == "bf16":
        assert fallback > 0  # the wide bound did send near-tied rows to the host


def test_default_precision_and_input_formats():
    assert pairwise.default_precision("cpu") == "HIGHEST"
    assert pairwise.default_precision("gpu") == "DEFAULT"
    assert pairwise.default_precision("tpu") == "HIGH"
    assert pairwise.input_format("DEFAULT", "cpu") == "float32"
    assert pairwise.input_format("DEFAULT", "gpu") == "tf32"
    assert pairwise.input_format("DEFAULT", "tpu") == "bf16"
    assert pairwise.input_format("HIGH", "tpu") == "tf32"
    assert pairwise.input_format("HIGHEST", "gpu") == "float32"
    assert pairwise.cosine_tolerance(64, "DEFAULT", "gpu") > pairwise.cosine_tolerance(64)
    with pytest.raises(checks.InputError, match="precision"):
        pairwise.cosine_tolerance(64, "fastest")


def test_max_cosine_rejects_unknown_precision():
    a = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(checks.InputError, match="precision 'tf32'"):
        pairwise.max_cosine(a, a, precision="tf32")
