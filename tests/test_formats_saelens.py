"""SAELens files: written here with SAELens's own names and conventions (no SAELens install),
loaded into the SAE type, and checked against a float64 numpy re-implementation of SAELens's
documented forward pass (``sae_lens/saes/{standard,topk,jumprelu,batchtopk}_sae.py``):

    sae_in = x - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc            (* ||W_dec_i|| when rescale_acts_by_decoder_norm)
    standard: relu(pre); topk: relu of the k largest pre; jumprelu: relu(pre) * (pre > relu(thr))
    x_hat  = (acts [/ ||W_dec_i||] [* finetuning_scaling_factor]) @ W_dec + b_dec

Plus exact round trips through `save_saelens` and one-line refusals of bad files.
"""

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.checks import InputError
from models import sae as sae_lib
from models.formats import (
    detect_format,
    load_sae,
    load_saelens,
    read_saelens_sparsity,
    save_saelens,
)

D_IN, D_SAE = 6, 10


# -- helpers: writing SAELens folders and the float64 reference --------------------------------


def _weights(rng, d_in=D_IN, d_sae=D_SAE):
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(scale=0.3, size=d_sae).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_dec": rng.normal(scale=0.5, size=d_in).astype(np.float32),
    }


def _write(folder: pathlib.Path, cfg: dict, tensors: dict) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(folder / "sae_weights.safetensors"),
    )
    return folder


def _v6_cfg(arch, d_in=D_IN, d_sae=D_SAE, **kw):
    cfg = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post",
            "sae_lens_version": "6.5.1",
            "context_size": 128,
        },
    }
    cfg.update(kw)
    return cfg


def saelens_reference(x, w, arch, apply_b_dec=True, k=None, rescale=False, fsf=None):
    """SAELens inference forward in float64 (returns acts, x_hat)."""
    f64 = {key: np.asarray(v, np.float64) for key, v in w.items()}
    x = np.asarray(x, np.float64)
    sae_in = x - f64["b_dec"] * float(apply_b_dec)
    pre = sae_in @ f64["W_enc"] + f64["b_enc"]
    norms = np.linalg.norm(f64["W_dec"], axis=1)
    if rescale:
        pre = pre * norms
    if arch == "standard":
        acts = np.maximum(pre, 0)
    elif arch == "topk":
        idx = np.argsort(-pre, axis=-1)[:, :k]
        acts = np.zeros_like(pre)
        rows = np.arange(pre.shape[0])[:, None]
        acts[rows, idx] = np.maximum(pre[rows, idx], 0)
    elif arch == "jumprelu":
        acts = np.maximum(pre, 0) * (pre > np.maximum(f64["threshold"], 0))
    else:
        raise ValueError(arch)
    a = acts / norms if rescale else acts
    if fsf is not None:
        a = a * fsf
    return acts, a @ f64["W_dec"] + f64["b_dec"]


def _check(sae, x, acts_ref, recon_ref, tol=2e-5):
    acts = np.asarray(sae.encode(x))
    np.testing.assert_allclose(acts, acts_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(sae.decode(sae.encode(x))), recon_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(sae(x)), recon_ref, rtol=tol, atol=tol)


@pytest.fixture
def x(rng):
    return rng.normal(size=(7, D_IN)).astype(np.float32)


# -- forward passes ----------------------------------------------------------------------------


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_v6_standard_matches_reference(tmp_path, rng, x, apply_b_dec):
    w = _weights(rng)
    folder = _write(tmp_path / "sae", _v6_cfg("standard", apply_b_dec_to_input=apply_b_dec), w)
    sae = load_saelens(folder)
    assert sae.config.activation == "relu" and sae.config.apply_b_dec_to_input == apply_b_dec
    _check(sae, x, *saelens_reference(x, w, "standard", apply_b_dec))
    # weights are taken as stored (no transposes, no renormalisation)
    np.testing.assert_array_equal(np.asarray(sae.W_enc), w["W_enc"])
    np.testing.assert_array_equal(np.asarray(sae.W_dec), w["W_dec"])


@pytest.mark.parametrize("rescale", [False, True])
def test_v6_topk_matches_reference(tmp_path, rng, x, rescale):
    w = _weights(rng)
    cfg = _v6_cfg("topk", k=3, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=False)
    sae = load_saelens(_write(tmp_path / "sae", cfg, w))
    assert sae.config.activation == "topk" and sae.config.k == 3
    acts_ref, recon_ref = saelens_reference(x, w, "topk", False, k=3, rescale=rescale)
    assert (acts_ref > 0).sum(axis=1).max() <= 3
    _check(sae, x, acts_ref, recon_ref)
    assert sae.config.meta.get("folded_decoder_norm", False) == rescale
    values, indices = sae.encode_sparse(x)
    dense = np.zeros_like(acts_ref)
    np.put_along_axis(dense, np.asarray(indices), np.asarray(values), axis=-1)
    np.testing.assert_allclose(dense, acts_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(sae.decode_sparse(values, indices)), recon_ref, rtol=2e-5, atol=2e-5
    )


def test_v6_jumprelu_matches_reference(tmp_path, rng, x):
    w = _weights(rng)
    w["threshold"] = rng.uniform(-0.5, 1.5, size=D_SAE).astype(np.float32)  # some negative
    sae = load_saelens(_write(tmp_path / "sae", _v6_cfg("jumprelu"), w))
    acts_ref, recon_ref = saelens_reference(x, w, "jumprelu")
    assert 0 < (acts_ref > 0).mean() < 1
    _check(sae, x, acts_ref, recon_ref)


def test_jumprelu_training_checkpoint_log_threshold(tmp_path, rng, x):
    w = _weights(rng)
    threshold = rng.uniform(0.1, 1.0, size=D_SAE)
    w["log_threshold"] = np.log(threshold).astype(np.float32)
    sae = load_saelens(_write(tmp_path / "sae", _v6_cfg("jumprelu"), w))
    ref_w = dict(w, threshold=np.exp(w["log_threshold"].astype(np.float64)))
    _check(sae, x, *saelens_reference(x, ref_w, "jumprelu"))


def test_batchtopk_training_checkpoint_is_thresholded(tmp_path, rng, x):
    """SAELens saves BatchTopK as JumpReLU with the learned topk_threshold; its training
    config rescales pre-activations by decoder norms by default."""
    w = _weights(rng)
    w["topk_threshold"] = np.array(1.2, np.float64)
    cfg = _v6_cfg("batchtopk", k=4.0)
    sae = load_saelens(_write(tmp_path / "sae", cfg, w))
    assert sae.config.activation == "batchtopk" and sae.config.k == 4
    norms = np.linalg.norm(w["W_dec"].astype(np.float64), axis=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"].astype(np.float64) + w["b_enc"]) * norms
    acts_ref = np.maximum(pre, 0) * (pre > 1.2)
    recon_ref = (acts_ref / norms) @ w["W_dec"].astype(np.float64) + w["b_dec"]
    assert 0 < (acts_ref > 0).mean() < 1
    _check(sae, x, acts_ref, recon_ref)


def test_pre6_topk_config(tmp_path, rng, x):
    w = _weights(rng)
    cfg = {
        "model_name": "pythia-70m",
        "hook_point": "blocks.2.hook_resid_post",
        "hook_point_layer": 2,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 2},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "dtype": "float32",
        "device": "cpu",
        "sae_lens_training_version": "3.13.0",
        "context_size": 128,
    }
    sae = load_saelens(_write(tmp_path / "old", cfg, w))
    assert sae.config.activation == "topk" and sae.config.k == 2
    meta = sae.config.meta
    assert meta["saelens_config_version"] == "pre-6.0"
    assert meta["hookpoint"] == "blocks.2.hook_resid_post"
    assert meta["canonical_hookpoint"] == "resid_post.2" and meta["model_name"] == "pythia-70m"
    _check(sae, x, *saelens_reference(x, w, "topk", k=2))


def test_versionless_config_with_metadata_reads_as_v6(tmp_path, rng, x):
    w = _weights(rng)
    cfg = _v6_cfg("topk", k=2)
    del cfg["metadata"]["sae_lens_version"]
    sae = load_saelens(_write(tmp_path / "nv", cfg, w))
    assert sae.config.meta["saelens_config_version"] == "6"
    assert sae.config.meta["hookpoint"] == "blocks.3.hook_resid_post"
    _check(sae, x, *saelens_reference(x, w, "topk", k=2))


def test_pre6_finetuning_scaling_factor_folded(tmp_path, rng, x):
    w = _weights(rng)
    w["scaling_factor"] = rng.uniform(0.5, 2.0, size=D_SAE).astype(np.float32)
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_name": "blocks.0.hook_mlp_out",
        "model_name": "gpt2",
        "finetuning_scaling_factor": True,
        "normalize_activations": "none",
    }
    sae = load_saelens(_write(tmp_path / "ft", cfg, w))
    assert sae.config.meta["canonical_hookpoint"] == "mlp_out.0"
    _check(sae, x, *saelens_reference(x, w, "standard", fsf=w["scaling_factor"].astype(np.float64)))


def test_square_sae_uses_saelens_orientation(tmp_path, rng):
    """d_in == d_sae: shapes cannot tell W_enc from W_enc.T; SAELens's layout decides."""
    d = 8
    w = _weights(rng, d, d)
    sae = load_saelens(_write(tmp_path / "sq", _v6_cfg("standard", d, d), w))
    xs = rng.normal(size=(5, d)).astype(np.float32)
    acts_ref, recon_ref = saelens_reference(xs, w, "standard")
    wrong, _ = saelens_reference(xs, dict(w, W_enc=w["W_enc"].T), "standard")
    assert not np.allclose(acts_ref, wrong, atol=1e-3)  # the orientation matters here
    _check(sae, xs, acts_ref, recon_ref)


def test_transposed_decoder_is_detected_from_the_config(tmp_path, rng, x):
    """SAELens 6.54's sparsify converter stores W_dec as [d_in, d_sae] (docs/references.md)."""
    w = _weights(rng)
    stored = dict(w, W_dec=np.ascontiguousarray(w["W_dec"].T))
    folder = _write(tmp_path / "t", _v6_cfg("standard"), stored)
    sae = load_saelens(folder)
    assert sae.config.meta["transposed_on_load"] == ("W_dec",)
    _check(sae, x, *saelens_reference(x, w, "standard"))
    with pytest.raises(InputError, match=r"'W_dec' has shape \(6, 10\), expected \(10, 6\)"):
        load_saelens(folder, allow_transposed=False)


def test_bfloat16_weights_widen_exactly(tmp_path, rng, x):
    import torch
    from safetensors.torch import save_file as save_torch

    w = _weights(rng)
    folder = tmp_path / "bf16"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(_v6_cfg("standard", dtype="bfloat16")))
    bf = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()}
    save_torch(bf, str(folder / "sae_weights.safetensors"))
    sae = load_saelens(folder)
    widened = {k: v.float().numpy() for k, v in bf.items()}
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(np.asarray(getattr(sae, key)), widened[key])
    _check(sae, x, *saelens_reference(x, widened, "standard"))


def test_expected_average_only_in(tmp_path, rng, x):
    w = _weights(rng)
    folder = _write(
        tmp_path / "n", _v6_cfg("standard", normalize_activations="expected_average_only_in"), w
    )
    s = 2.5
    sae = load_saelens(folder, norm_scaling_factor=s)
    assert sae.config.input_scale == s
    # SAELens fold_activation_norm_scaling_factor: W_enc * s, W_dec / s, b_dec / s
    folded = dict(
        w,
        W_enc=w["W_enc"] * np.float64(s),
        W_dec=w["W_dec"] / np.float64(s),
        b_dec=w["b_dec"] / np.float64(s),
    )
    _check(sae, x, *saelens_reference(x, folded, "standard"))
    plain = load_saelens(folder)  # no factor known: no scaling, as SAELens's load_from_disk
    assert plain.config.input_scale == 1.0 and plain.config.meta["norm_scaling_factor_missing"]
    _check(plain, x, *saelens_reference(x, w, "standard"))


def test_runtime_norms_refused_unless_ignored(tmp_path, rng):
    folder = _write(
        tmp_path / "ln", _v6_cfg("standard", normalize_activations="layer_norm"), _weights(rng)
    )
    with pytest.raises(InputError, match="per-token normalisation"):
        load_saelens(folder)
    sae = load_saelens(folder, ignore_runtime_norm=True)
    assert sae.config.meta["ignored_normalization"] == "layer_norm"


def test_provenance_and_sparsity(tmp_path, rng):
    folder = _write(tmp_path / "p", _v6_cfg("standard"), _weights(rng))
    assert read_saelens_sparsity(folder) is None
    log10_density = rng.uniform(-6, 0, size=D_SAE).astype(np.float32)
    save_file({"sparsity": log10_density}, str(folder / "sparsity.safetensors"))
    np.testing.assert_array_equal(read_saelens_sparsity(folder), log10_density)
    meta = load_sae(folder).config.meta
    assert meta["format"] == "saelens" and meta["source_path"] == str(folder.resolve())
    assert meta["hookpoint"] == "blocks.3.hook_resid_post"
    assert meta["canonical_hookpoint"] == "resid_post.3"
    assert meta["model_name"] == "gpt2" and meta["context_size"] == 128
    assert meta["has_sparsity"] is True
    assert detect_format(folder) == detect_format(folder / "cfg.json") == "saelens"


# -- round trips -------------------------------------------------------------------------------


def _random_sae(rng, activation, input_scale=1.0, apply_b_dec=True):
    k = 3 if activation in ("topk", "batchtopk") else 0
    cfg = sae_lib.SAEConfig(D_IN, D_SAE, activation, k, apply_b_dec, input_scale).with_metadata(
        model_name="pythia-70m", hookpoint="layers.4", note={"runs": [1, 2]}, seed=7
    )
    w = _weights(rng)
    thr = rng.uniform(0, 1, D_SAE) if activation in ("jumprelu", "batchtopk") else None
    return sae_lib.from_arrays(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], thr)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("input_scale", [1.0, 0.37])
def test_round_trip_is_exact(tmp_path, rng, activation, input_scale):
    sae = _random_sae(rng, activation, input_scale, apply_b_dec=activation != "jumprelu")
    sparsity = rng.uniform(-5, 0, D_SAE).astype(np.float32)
    folder = save_saelens(tmp_path / "rt", sae, sparsity=sparsity)
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    back = load_saelens(folder, record_provenance=False)
    np.testing.assert_array_equal(read_saelens_sparsity(folder), sparsity)
    with_prov = load_saelens(folder).config.meta
    assert with_prov.pop("format") == "saelens" and with_prov.pop("source_path")
    if input_scale == 1.0:
        assert back.config == sae.config
        for key, value in sae.to_numpy().items():
            np.testing.assert_array_equal(np.asarray(getattr(back, key)), value)
        assert with_prov == sae.config.meta
        return
    # An input scale is folded into the weights (SAELens ignores it at inference): the
    # folded SAE is the same function.
    import dataclasses

    assert back.config == dataclasses.replace(sae.config, input_scale=1.0).with_metadata(
        folded_input_scale=input_scale
    )
    assert with_prov == {**sae.config.meta, "folded_input_scale": input_scale}
    x = np.random.default_rng(1).normal(size=(9, D_IN)).astype(np.float32) / input_scale
    np.testing.assert_allclose(
        np.asarray(back.encode(x)), np.asarray(sae.encode(x)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(back(x)) * input_scale, np.asarray(sae(x)) * input_scale, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(back.threshold), np.asarray(sae.threshold))


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("input_scale", [1.0, 0.37, 3.0])
def test_saved_files_are_plain_saelens(tmp_path, rng, x, activation, input_scale):
    """Without the exact-config block the file is an ordinary SAELens v6 SAE whose forward
    (by SAELens's rules, the float64 reference, which applies NO input normalisation at
    inference) is the original SAE's: an input scale must be folded into the weights."""
    sae = _random_sae(rng, activation, input_scale)
    x = x * np.float32(4.0 / input_scale)  # inputs on the scale the SAE was trained for
    folder = save_saelens(tmp_path / "plain", sae)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    expected_arch = {
        "relu": "standard",
        "topk": "topk",
        "jumprelu": "jumprelu",
        "batchtopk": "jumprelu",
    }[activation]
    assert cfg["architecture"] == expected_arch and cfg["metadata"]["hook_name"] == "layers.4"
    from models.formats._common import read_safetensors

    stored, _ = read_safetensors(folder / "sae_weights.safetensors", "test")
    want = {"W_enc", "b_enc", "W_dec", "b_dec"}
    want |= {"threshold"} if expected_arch == "jumprelu" else set()
    assert set(stored) == want
    acts_ref, recon_ref = saelens_reference(x, stored, expected_arch, k=cfg.get("k"))
    tol = 2e-5 * max(1.0, float(np.abs(recon_ref).max()))
    _check(sae, x, acts_ref, recon_ref, tol)
    del cfg["sae_universality"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    _check(load_saelens(folder), x, acts_ref, recon_ref, tol)


def test_input_scale_is_always_folded(tmp_path, rng, x):
    sae = _random_sae(rng, "relu", input_scale=3.0)
    folder = save_saelens(tmp_path / "fold", sae)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert "norm_scaling_factor" not in cfg["metadata"]
    back = load_saelens(folder)
    assert back.config.input_scale == 1.0 and back.config.meta["folded_input_scale"] == 3.0
    np.testing.assert_allclose(np.asarray(back(x)), np.asarray(sae(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(back.encode(x)), np.asarray(sae.encode(x)), rtol=1e-5, atol=1e-5
    )


# -- bad input ---------------------------------------------------------------------------------


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_missing_files(tmp_path, rng):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(_v6_cfg("standard")))
    with pytest.raises(InputError, match="missing file .*sae_weights.safetensors") as e:
        load_sae(folder)
    _one_line(e)
    weights_only = tmp_path / "w"
    _write(weights_only, _v6_cfg("standard"), _weights(rng))
    (weights_only / "cfg.json").unlink()
    with pytest.raises(InputError, match="missing file .*cfg.json"):
        load_saelens(weights_only)


@pytest.mark.parametrize("cut", [4, 40, -20])
def test_truncated_safetensors(tmp_path, rng, cut):
    folder = _write(tmp_path / "tr", _v6_cfg("standard"), _weights(rng))
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(InputError, match="truncated") as e:
        load_saelens(folder)
    _one_line(e)


def test_garbage_weights_file(tmp_path, rng):
    folder = _write(tmp_path / "g", _v6_cfg("standard"), _weights(rng))
    (folder / "sae_weights.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + b"\x00" * 64
    )
    with pytest.raises(InputError, match="not a safetensors file"):
        load_saelens(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_saelens(folder)


@pytest.mark.parametrize(
    "arch, message",
    [
        ("mystery", "unknown architecture 'mystery'"),
        ("gated", "architecture 'gated' is not supported"),
    ],
)
def test_unknown_or_unsupported_architecture(tmp_path, rng, arch, message):
    folder = _write(tmp_path / "a", _v6_cfg(arch), _weights(rng))
    with pytest.raises(InputError, match=message) as e:
        load_sae(folder)
    _one_line(e)


def test_wrong_shapes(tmp_path, rng):
    w = _weights(rng)
    bad_enc = dict(w, W_enc=rng.normal(size=(D_IN + 1, D_SAE)).astype(np.float32))
    with pytest.raises(InputError, match=r"'W_enc' has shape \(7, 10\), expected \(6, 10\)"):
        load_saelens(_write(tmp_path / "a", _v6_cfg("standard"), bad_enc))
    bad_bias = dict(w, b_dec=np.zeros(D_IN + 2, np.float32))
    with pytest.raises(InputError, match=r"'b_dec' has shape \(8,\), expected \(6,\)"):
        load_saelens(_write(tmp_path / "b", _v6_cfg("standard"), bad_bias))
    with pytest.raises(InputError, match="expected"):  # cfg d_sae disagrees with the tensors
        load_saelens(_write(tmp_path / "c", _v6_cfg("standard", d_sae=D_SAE + 3), w))
    jump = _write(tmp_path / "d", _v6_cfg("jumprelu"), w)
    with pytest.raises(InputError, match="needs a 'threshold' tensor"):
        load_saelens(jump)
    with pytest.raises(InputError, match=r"unexpected tensor\(s\) \['W_skip'\]"):
        load_saelens(
            _write(
                tmp_path / "e", _v6_cfg("standard"), dict(w, W_skip=np.eye(D_IN, dtype=np.float32))
            )
        )


def test_nan_weights_refused(tmp_path, rng):
    w = _weights(rng)
    w["W_dec"][3, 2] = np.nan
    with pytest.raises(InputError, match=r"W_dec: 1 non-finite value\(s\).*\(3, 2\)") as e:
        load_saelens(_write(tmp_path / "nan", _v6_cfg("standard"), w))
    _one_line(e)


@pytest.mark.parametrize(
    "update, message",
    [
        ({"k": 2.5}, "'k' must be an integer"),
        ({"k": D_SAE + 1}, "exceeds d_sae"),
        ({"normalize_activations": "whiten"}, "unknown normalize_activations"),
        ({"d_in": "six"}, "'d_in' must be an integer"),
    ],
)
def test_bad_config_values(tmp_path, rng, update, message):
    cfg = _v6_cfg("topk", k=3)
    cfg.update(update)
    with pytest.raises(InputError, match=message) as e:
        load_saelens(_write(tmp_path / "c", cfg, _weights(rng)))
    _one_line(e)
