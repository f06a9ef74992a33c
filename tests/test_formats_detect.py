"""Format auto-detection and the hookpoint-name mapping shared by the loaders."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from engine.checks import InputError
from models import sae as sae_lib
from models.formats import (
    FORMATS,
    canonical_hookpoint,
    detect_format,
    load_sae,
    load_saelens,
    save_saelens,
)


def test_detects_each_format_from_folder_or_file(tmp_path):
    z = np.zeros
    saelens = tmp_path / "saelens"
    saelens.mkdir()
    (saelens / "cfg.json").write_text(
        json.dumps({"architecture": "standard", "d_in": 2, "d_sae": 3})
    )
    save_file({"W_enc": z((2, 3), np.float32)}, str(saelens / "sae_weights.safetensors"))
    sparsify = tmp_path / "run" / "layers.0"
    sparsify.mkdir(parents=True)
    (sparsify / "cfg.json").write_text(json.dumps({"k": 1, "num_latents": 3, "d_in": 2}))
    save_file({"b_dec": z(2, np.float32)}, str(sparsify / "sae.safetensors"))
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    np.savez(gemma / "params.npz", b_dec=z(2))
    dl = tmp_path / "dl"
    dl.mkdir()
    torch.save({"bias": torch.zeros(2)}, dl / "ae.pt")
    native = tmp_path / "native"
    (native / "params").mkdir(parents=True)
    (native / "sae_config.json").write_text("{}")
    cases = {
        saelens: "saelens",
        saelens / "cfg.json": "saelens",
        saelens / "sae_weights.safetensors": "saelens",
        sparsify: "sparsify",
        sparsify / "sae.safetensors": "sparsify",
        tmp_path / "run": "sparsify",
        gemma: "gemma_scope",
        gemma / "params.npz": "gemma_scope",
        dl: "dictionary_learning",
        dl / "ae.pt": "dictionary_learning",
        native: "native",
        native / "sae_config.json": "native",
    }
    for path, fmt in cases.items():
        assert detect_format(path) == fmt, path
    assert set(cases.values()) == set(FORMATS)


def test_unknown_paths_refused(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        detect_format(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="unknown SAE file 'weights.bin'"):
        load_sae(tmp_path / "weights.bin")
    with pytest.raises(InputError, match="cannot tell the SAE format") as e:
        load_sae(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown 'onnx'"):
        load_sae(tmp_path, format="onnx")


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("blocks.5.hook_resid_post", "resid_post.5"),
        ("blocks.5.hook_resid_pre", "resid_pre.5"),
        ("blocks.0.hook_mlp_out", "mlp_out.0"),
        ("blocks.2.hook_attn_out", "attn_out.2"),
        ("layers.7", "resid_post.7"),
        ("gpt_neox.layers.7", "resid_post.7"),
        ("model.layers.7.mlp", "mlp_out.7"),
        ("layers.7.self_attn", "attn_out.7"),
        ("resid_post_layer_3", "resid_post.3"),
        ("resid_pre.4", "resid_pre.4"),
        ("blocks.12.attn.hook_z", None),
        ("embed_tokens", None),
        (None, None),
    ],
)
def test_canonical_hookpoints(name, canonical):
    """SAELens blocks.L.hook_resid_post and sparsify layers.L are both block L's output."""
    assert canonical_hookpoint(name) == canonical


def test_native_and_saelens_round_trips_agree(tmp_path, rng):
    """SAELens -> native (models/sae_io_native.py) -> SAELens keeps every bit and the config."""
    from models import sae_io_native

    for scale in (1.0, 0.5):
        cfg = sae_lib.SAEConfig(5, 9, "topk", 2, True, scale).with_metadata(model_name="m", seed=3)
        sae = sae_lib.from_arrays(
            cfg,
            rng.normal(size=(5, 9)),
            rng.normal(size=9),
            rng.normal(size=(9, 5)),
            rng.normal(size=5),
        )
        first = load_saelens(save_saelens(tmp_path / f"a{scale}", sae), record_provenance=False)
        sae_io_native.save_sae(str(tmp_path / f"n{scale}"), first)
        assert detect_format(tmp_path / f"n{scale}") == "native"
        via_native = load_sae(tmp_path / f"n{scale}")
        second = load_saelens(
            save_saelens(tmp_path / f"b{scale}", via_native), record_provenance=False
        )
        # An input scale is folded into the SAELens copy once (SAELens does not apply it);
        # from then on every round trip keeps every bit.
        want = sae if scale == 1.0 else first
        for s in (first, via_native, second):
            assert s.config == want.config
            for key, value in want.to_numpy().items():
                np.testing.assert_array_equal(np.asarray(getattr(s, key)), value)
    sae_io_native.save_sae(str(tmp_path / "n"), first)
    with pytest.raises(InputError, match="takes no options"):
        load_sae(tmp_path / "n", hookpoint="x")
