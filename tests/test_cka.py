"""Linear CKA, debiased CKA and minibatch CKA (engine/cka.py) and the PairMoments accumulator
(engine/paired_stats.py) against float64 numpy references (Gram-matrix HSIC)."""

import numpy as np
import pytest
import similarity_refs as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from engine import checks, cka, paired_stats, streaming

N, D1, D2 = 200, 6, 5  # shared with test_cca / test_geometry: compiled steps are reused


def structured(seed, n=N, d1=D1, d2=D2, offset=40.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.5, 2.0, d1) + offset
    y = (x[:, :4] - offset) @ rng.normal(size=(4, d2)) + 0.8 * rng.normal(size=(n, d2)) + offset
    return x.astype(np.float32), y.astype(np.float32)


def random_pair(seed, n=N, d1=D1, d2=D2):
    return ref.random_pair(seed, n, d1, d2)


INPUTS = {"random": random_pair(0), "structured": structured(1)}


def test_pair_moments_match_numpy_float64_streamed_and_merged(mesh):
    x, y = INPUTS["structured"]
    want = paired_stats.stats_from_numpy(x, y)

    def open_at(start):
        for lo in range(start, N, 70):
            yield x[lo : lo + 70], y[lo : lo + 70]

    got = paired_stats.stream_stats(streaming.ChunkStream(open_at, 48), mesh)
    assert got.rows == N and got.count == N
    for field in ("mean_x", "mean_y", "cov_xx", "cov_yy", "cov_xy"):
        a, b = getattr(got, field), getattr(want, field)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    for field in ("q_xx", "q_yy", "q_xy"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5)


def test_stream_stats_resumes_from_a_checkpoint(mesh4, tmp_path):
    from engine import checkpoint

    x, y = INPUTS["structured"]
    # First pass stops after 96 rows (a simulated kill); the second resumes from its save.
    ck = checkpoint.Checkpointer(str(tmp_path / "pm"))
    paired_stats.stream_stats(
        streaming.ChunkStream((x[:96], y[:96]), 48), mesh4, checkpointer=ck, save_every=1
    )
    ck.close()
    ck = checkpoint.Checkpointer(str(tmp_path / "pm"))
    got = paired_stats.stream_stats(
        streaming.ChunkStream((x, y), 48), mesh4, checkpointer=ck, save_every=1
    )
    want = paired_stats.stats_from_numpy(x, y)
    assert got.rows == N
    np.testing.assert_allclose(
        got.cov_xy, want.cov_xy, rtol=1e-5, atol=1e-5 * np.abs(want.cov_xy).max()
    )
    np.testing.assert_allclose(got.q_xy, want.q_xy, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_cka_biased_and_debiased_match_references(kind, mesh):
    x, y = INPUTS[kind]
    got = cka.linear_cka(x, y, mesh=mesh, chunk_size=48)
    np.testing.assert_allclose(got.score, ref.linear_cka(x, y), rtol=1e-5, atol=1e-7)
    want_d = ref.debiased_cka(x, y)
    got_d = cka.linear_cka(x, y, debiased=True, mesh=mesh, chunk_size=48)
    np.testing.assert_allclose(got_d.score, want_d, rtol=1e-5, atol=2e-6)
    # The unbiased HSIC is invariant to centring: the raw-Gram reference agrees.
    np.testing.assert_allclose(ref.debiased_cka(x, y, centred=False), want_d, rtol=1e-9)
    assert got.to_dict()["n_over_d"] == pytest.approx(N / D1)


def test_minibatch_cka_matches_per_batch_gram_reference(mesh):
    x, y = INPUTS["structured"]
    got = cka.minibatch_cka(x, y, batch_size=48, mesh=mesh)  # 4 full batches + 8 rows
    np.testing.assert_allclose(got.score, ref.minibatch_cka(x, y, 48), rtol=1e-5)
    assert got.batches == 5
    # One batch holding every row is the debiased CKA.
    one = cka.minibatch_cka(x, y, batch_size=256, mesh=mesh)
    np.testing.assert_allclose(one.score, ref.debiased_cka(x, y), rtol=1e-5)


def test_frequency_weights_equal_repeated_rows():
    x, y = INPUTS["structured"]
    w = np.random.default_rng(2).integers(0, 3, N)
    rep = np.repeat(np.arange(N), w)
    wf = w.astype(np.float32)
    np.testing.assert_allclose(cka.linear_cka(x, y, wf).score, ref.linear_cka(x, y, w), rtol=1e-5)
    np.testing.assert_allclose(
        cka.linear_cka(x, y, wf, debiased=True).score, ref.debiased_cka(x[rep], y[rep]), rtol=1e-5
    )


def test_streamed_matches_in_memory(mesh):
    x, y = INPUTS["structured"]
    stream = streaming.ChunkStream((x, y), 48)
    got = cka.from_stream(stream, mesh, debiased=True)
    np.testing.assert_allclose(got.score, ref.debiased_cka(x, y), rtol=1e-5)
    mb = cka.minibatch_cka_stream(streaming.ChunkStream((x, y), 48), mesh)
    np.testing.assert_allclose(mb.score, ref.minibatch_cka(x, y, 48), rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, scale):
    x, y = structured(seed)
    q = ortho_group.rvs(D1, random_state=seed)
    moved = ((x - 40.0) @ q * scale + 5.0).astype(np.float32)
    for debiased in (False, True):
        a = cka.linear_cka(x, y, debiased=debiased).score
        b = cka.linear_cka(moved, y, debiased=debiased).score
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_identical_inputs_give_one_and_symmetry(seed):
    x, y = structured(seed)
    for debiased in (False, True):
        np.testing.assert_allclose(cka.linear_cka(x, x, debiased=debiased).score, 1.0, atol=2e-6)
        np.testing.assert_allclose(
            cka.linear_cka(x, y, debiased=debiased).score,
            cka.linear_cka(y, x, debiased=debiased).score,
            rtol=1e-5,
        )


def test_bad_inputs():
    x, y = INPUTS["random"]
    with pytest.raises(checks.InputError, match="constant"):
        cka.linear_cka(np.full_like(x, 2.0), y)
    with pytest.raises(checks.InputError, match="at least 4"):
        cka.linear_cka(x[:3], y[:3], debiased=True)
    with pytest.raises(checks.InputError, match="rows"):
        cka.linear_cka(x, y[:-2])
    with pytest.raises(checks.InputError, match="non-finite"):
        cka.linear_cka(np.where(x > 1.5, np.inf, x), y)
    with pytest.raises(checks.InputError, match="dtype"):
        cka.linear_cka(x, y.astype(np.float16))
    with pytest.raises(checks.InputError, match="expected chunks"):
        cka.from_stream(streaming.ChunkStream((x,), 48), paired_stats.default_mesh())
