"""Cached steps are keyed by every byte they depend on (issue 12): `engine.fingerprint.digest`,
`SAE.fingerprint`, and the pipeline's feature-pass key.

Before: an SAE's key hashed its first 64 decoder rows and encoder biases, so two SAEs differing
only in feature 100 shared cached results, and the feature pass key ignored the activations.
"""

import numpy as np

from engine import fingerprint as fp_lib
from models import sae as sae_lib


def _sae(rng, d_in=8, d_sae=128):
    cfg = sae_lib.SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=4)
    return sae_lib.from_arrays(
        cfg,
        rng.normal(size=(d_in, d_sae)),
        rng.normal(size=d_sae),
        rng.normal(size=(d_sae, d_in)),
        rng.normal(size=d_in),
    )


def test_digest_covers_every_byte_dtype_and_shape(rng):
    x = rng.normal(size=(1000, 64)).astype(np.float32)
    y = x.copy()
    assert fp_lib.digest(x) == fp_lib.digest(y)
    y[-1, -1] = np.nextafter(y[-1, -1], np.float32(np.inf))  # one ulp, last element
    assert fp_lib.digest(x) != fp_lib.digest(y)
    assert fp_lib.digest(x) != fp_lib.digest(x.reshape(64, 1000))
    assert fp_lib.digest(x) != fp_lib.digest(x.astype(np.float64))
    assert fp_lib.digest(x[:, ::2]) == fp_lib.digest(np.ascontiguousarray(x[:, ::2]))
    assert fp_lib.digest("a", 1) != fp_lib.digest("a", 2)
    assert len(fp_lib.digest(x, size=8)) == 16


def test_sae_fingerprint_sees_every_weight(rng):
    sae = _sae(rng)
    base = sae.fingerprint()
    p = sae.to_numpy()
    for field, index in (
        ("W_dec", (100, 3)),
        ("W_enc", (7, 127)),
        ("b_enc", (120,)),
        ("b_dec", (7,)),
        ("threshold", (127,)),
    ):
        q = {k: v.copy() for k, v in p.items()}
        q[field][index] += 1e-3
        other = sae_lib.from_arrays(sae.config, **q)
        assert other.fingerprint() != base, field
    same = sae_lib.from_arrays(sae.config, **p)
    assert same.fingerprint() == base


def test_feature_pass_key_changes_with_the_activations(rng):
    from experiments.pipeline import compare

    sae_a, sae_b = _sae(rng), _sae(rng)
    xa = rng.normal(size=(256, 8)).astype(np.float32)
    xb = xa.copy()
    xb[200] += 1.0
    key = compare._fingerprint(
        sae_a.fingerprint(),
        sae_b.fingerprint(),
        10,
        fp_lib.digest(fp_lib.digest(xa), fp_lib.digest(xa)),
    )
    other = compare._fingerprint(
        sae_a.fingerprint(),
        sae_b.fingerprint(),
        10,
        fp_lib.digest(fp_lib.digest(xa), fp_lib.digest(xb)),
    )
    assert key != other
