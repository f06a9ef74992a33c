"""EleutherAI sparsify files: a run folder with one folder per hookpoint (``cfg.json`` +
``sae.safetensors`` written with sparsify's tensor names), loaded into the SAE type and
checked against a float64 numpy version of ``SparseCoder.encode`` / ``decode``:

    x' = x - b_dec            (unless transcode)
    pre = relu(x' @ encoder.weight.T + encoder.bias)      encoder is an nn.Linear
    top_acts, top_idx = top-k of pre                        (unsorted in sparsify)
    x_hat = sum_j top_acts_j * W_dec[top_idx_j] + b_dec     W_dec is [num_latents, d_in]
"""

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.checks import InputError
from models.formats import (
    detect_format,
    load_sae,
    load_saelens,
    load_sparsify,
    save_saelens,
    sparsify_hookpoints,
)


def _write_coder(
    folder: pathlib.Path,
    rng,
    d_in,
    num_latents_cfg,
    k,
    expansion_factor=32,
    extra_cfg=None,
    extra_tensors=None,
    **cfg_overrides,
):
    n = num_latents_cfg or d_in * expansion_factor
    tensors = {
        "encoder.weight": rng.normal(size=(n, d_in)).astype(np.float32),
        "encoder.bias": rng.normal(scale=0.3, size=n).astype(np.float32),
        "W_dec": rng.normal(size=(n, d_in)).astype(np.float32),
        "b_dec": rng.normal(scale=0.5, size=d_in).astype(np.float32),
    }
    tensors.update(extra_tensors or {})
    cfg = {
        "activation": "topk",
        "expansion_factor": expansion_factor,
        "normalize_decoder": True,
        "num_latents": num_latents_cfg,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    cfg.update(extra_cfg or {})
    cfg.update(cfg_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    return tensors


def sparsify_reference(x, t, k, transcode=False):
    """(dense acts, top values, top indices, x_hat) in float64, as SparseCoder computes them."""
    f = {key: np.asarray(v, np.float64) for key, v in t.items()}
    x = np.asarray(x, np.float64)
    if not transcode:
        x = x - f["b_dec"]
    pre = np.maximum(x @ f["encoder.weight"].T + f["encoder.bias"], 0)
    idx = np.argpartition(-pre, k - 1, axis=-1)[:, :k]  # unsorted, like sparsify
    vals = np.take_along_axis(pre, idx, axis=-1)
    recon = np.einsum("bk,bkd->bd", vals, f["W_dec"][idx]) + f["b_dec"]
    dense = np.zeros_like(pre)
    np.put_along_axis(dense, idx, vals, axis=-1)
    return dense, vals, idx, recon


def _check(sae, x, ref, tol=2e-5):
    dense, vals, idx, recon = ref
    np.testing.assert_allclose(np.asarray(sae.encode(x)), dense, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(sae(x)), recon, rtol=tol, atol=tol)
    values, indices = (np.asarray(a) for a in sae.encode_sparse(x))
    # the same latents with the same values (entries at 0 may pick any index, as in sparsify)
    scattered = np.zeros_like(dense)
    np.put_along_axis(scattered, indices, values, axis=-1)
    np.testing.assert_allclose(scattered, dense, rtol=tol, atol=tol)
    assert values.shape == vals.shape and idx.shape == indices.shape
    np.testing.assert_allclose(
        np.asarray(sae.decode_sparse(values, indices)), recon, rtol=tol, atol=tol
    )


@pytest.fixture
def run(tmp_path, rng):
    """A sparsify run folder with two hookpoints and the training config.json."""
    root = tmp_path / "pythia-sparsify"
    t2 = _write_coder(root / "layers.2", rng, d_in=6, num_latents_cfg=16, k=4)
    t3 = _write_coder(root / "layers.3.mlp", rng, d_in=6, num_latents_cfg=12, k=3)
    (root / "config.json").write_text(
        json.dumps(
            {
                "model": "EleutherAI/pythia-70m",
                "dataset": "EleutherAI/fineweb-edu-dedup-10b",
                "sae": {"k": 4},
                "hookpoints": ["layers.2", "layers.3.mlp"],
                "batch_size": 8,
            }
        )
    )
    return root, {"layers.2": t2, "layers.3.mlp": t3}


def test_hookpoint_forward_matches_reference(run, rng):
    root, tensors = run
    x = rng.normal(size=(9, 6)).astype(np.float32)
    sae = load_sparsify(root, hookpoint="layers.2")
    assert (sae.config.d_in, sae.config.d_sae, sae.config.activation, sae.config.k) == (
        6,
        16,
        "topk",
        4,
    )
    assert sae.config.apply_b_dec_to_input
    _check(sae, x, sparsify_reference(x, tensors["layers.2"], 4))
    np.testing.assert_array_equal(np.asarray(sae.W_enc), tensors["layers.2"]["encoder.weight"].T)
    meta = sae.config.meta
    assert meta["format"] == "sparsify" and meta["hookpoint"] == "layers.2"
    assert meta["canonical_hookpoint"] == "resid_post.2"
    assert meta["model_name"] == "EleutherAI/pythia-70m"
    mlp = load_sae(root / "layers.3.mlp")
    assert mlp.config.meta["canonical_hookpoint"] == "mlp_out.3"
    _check(mlp, x, sparsify_reference(x, tensors["layers.3.mlp"], 3))


def test_run_folder_needs_a_hookpoint(run):
    root, _ = run
    assert sparsify_hookpoints(root) == ["layers.2", "layers.3.mlp"]
    assert detect_format(root) == "sparsify"
    with pytest.raises(
        InputError,
        match=r"holds 2 hookpoints; pass hookpoint= one of "
        r"\['layers.2', 'layers.3.mlp'\]",
    ) as e:
        load_sae(root)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="no hookpoint 'layers.9'"):
        load_sae(root, hookpoint="layers.9")


def test_square_coder_uses_linear_orientation(tmp_path, rng):
    """num_latents = 0 -> d_in * expansion_factor; with expansion 1 the encoder is square, and
    only the nn.Linear convention (encoder.weight is [out, in]) gives the right answer."""
    t = _write_coder(tmp_path / "layers.0", rng, d_in=8, num_latents_cfg=0, k=3, expansion_factor=1)
    sae = load_sparsify(tmp_path / "layers.0")
    assert sae.config.d_sae == 8
    x = rng.normal(size=(6, 8)).astype(np.float32)
    ref = sparsify_reference(x, t, 3)
    wrong = sparsify_reference(x, dict(t, **{"encoder.weight": t["encoder.weight"].T}), 3)
    assert not np.allclose(ref[0], wrong[0], atol=1e-3)
    _check(sae, x, ref)


def test_num_latents_from_expansion_factor(tmp_path, rng):
    _write_coder(tmp_path / "h", rng, d_in=4, num_latents_cfg=0, k=2, expansion_factor=3)
    assert load_sparsify(tmp_path / "h").config.d_sae == 12


def test_b_dec_subtracted_whatever_normalize_decoder_says(tmp_path, rng):
    """SAELens's converter sets apply_b_dec_to_input from normalize_decoder; sparsify always
    subtracts b_dec for autoencoders (docs/references.md pitfall)."""
    t = _write_coder(tmp_path / "h", rng, d_in=6, num_latents_cfg=10, k=3, normalize_decoder=False)
    sae = load_sparsify(tmp_path / "h")
    assert sae.config.apply_b_dec_to_input
    x = rng.normal(size=(5, 6)).astype(np.float32)
    _check(sae, x, sparsify_reference(x, t, 3))


def test_transcoder_does_not_subtract_b_dec(tmp_path, rng):
    t = _write_coder(
        tmp_path / "layers.1.mlp", rng, d_in=6, num_latents_cfg=10, k=3, transcode=True
    )
    sae = load_sparsify(tmp_path / "layers.1.mlp")
    assert not sae.config.apply_b_dec_to_input and sae.config.meta["transcoder"] is True
    x = rng.normal(size=(5, 6)).astype(np.float32)
    _check(sae, x, sparsify_reference(x, t, 3, transcode=True))


def test_zero_skip_connection_accepted_nonzero_refused(tmp_path, rng):
    t = _write_coder(
        tmp_path / "a",
        rng,
        d_in=4,
        num_latents_cfg=8,
        k=2,
        extra_tensors={"W_skip": np.zeros((4, 4), np.float32)},
    )
    x = rng.normal(size=(3, 4)).astype(np.float32)
    _check(load_sparsify(tmp_path / "a"), x, sparsify_reference(x, t, 2))
    _write_coder(
        tmp_path / "b",
        rng,
        d_in=4,
        num_latents_cfg=8,
        k=2,
        skip_connection=True,
        extra_tensors={"W_skip": np.eye(4, dtype=np.float32)},
    )
    with pytest.raises(InputError, match="non-zero skip connection"):
        load_sparsify(tmp_path / "b")


def test_round_trip_through_saelens(run, tmp_path, rng):
    root, tensors = run
    sae = load_sparsify(root, hookpoint="layers.2")
    back = load_saelens(save_saelens(tmp_path / "as_saelens", sae), record_provenance=False)
    assert back.config == sae.config
    for key, value in sae.to_numpy().items():
        np.testing.assert_array_equal(np.asarray(getattr(back, key)), value)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    _check(back, x, sparsify_reference(x, tensors["layers.2"], 4))


# -- bad input ---------------------------------------------------------------------------------


def test_groupmax_refused(tmp_path, rng):
    _write_coder(tmp_path / "g", rng, d_in=4, num_latents_cfg=8, k=2, activation="groupmax")
    with pytest.raises(InputError, match="activation 'groupmax' is not supported"):
        load_sparsify(tmp_path / "g")


def test_missing_and_truncated_weights(tmp_path, rng):
    _write_coder(tmp_path / "h", rng, d_in=4, num_latents_cfg=8, k=2)
    path = tmp_path / "h" / "sae.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_sae(tmp_path / "h")
    path.unlink()
    with pytest.raises(InputError, match="missing file .*sae.safetensors"):
        load_sae(tmp_path / "h")


def test_wrong_shapes_and_nan(tmp_path, rng):
    bad = {"encoder.weight": np.zeros((9, 4), np.float32)}
    _write_coder(tmp_path / "a", rng, d_in=4, num_latents_cfg=8, k=2, extra_tensors=bad)
    with pytest.raises(
        InputError,
        match=r"'encoder.weight' has shape \(9, 4\), expected "
        r"\(8, 4\)",
    ):
        load_sparsify(tmp_path / "a")
    t = _write_coder(tmp_path / "b", rng, d_in=4, num_latents_cfg=8, k=2)
    t["W_dec"][1, 1] = np.inf
    save_file(t, str(tmp_path / "b" / "sae.safetensors"))
    with pytest.raises(InputError, match="W_dec: 1 non-finite"):
        load_sparsify(tmp_path / "b")
    _write_coder(tmp_path / "c", rng, d_in=4, num_latents_cfg=8, k=9)
    with pytest.raises(InputError, match="exceeds d_sae"):
        load_sparsify(tmp_path / "c")
