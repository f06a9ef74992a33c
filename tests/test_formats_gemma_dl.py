"""Gemma Scope ``params.npz`` and dictionary_learning ``ae.pt`` files, written with the
libraries' own names and conventions and checked against float64 numpy versions of their
documented forward passes:

Gemma Scope (tutorial ``JumpReLUSAE``): pre = x @ W_enc + b_enc; acts = (pre > threshold) *
relu(pre); x_hat = acts @ W_dec + b_dec.

dictionary_learning (``dictionary.py`` / ``trainers/top_k.py``; nn.Linear(x) = x @ weight.T + bias):
AutoEncoder relu(enc(x - bias)), dec(f) + bias; AutoEncoderNew relu(enc(x)), dec(f);
JumpReluAutoEncoder f = relu(pre * (pre > thr)) * ||W_dec_i||, decode (f / ||W_dec_i||) @ W_dec +
b_dec; AutoEncoderTopK top-k of relu(enc(x - b_dec)); BatchTopKSAE relu(enc(x - b_dec)) kept where
> threshold; MatryoshkaBatchTopKSAE the same with W_enc [d, dict].
"""

import json
import pathlib

import numpy as np
import pytest
import torch

from engine.checks import InputError
from models.formats import (
    detect_format,
    load_dictionary_learning,
    load_gemma_scope,
    load_sae,
    load_saelens,
    save_saelens,
)

D, N = 6, 10


def _check(sae, x, acts_ref, recon_ref, tol=2e-5):
    np.testing.assert_allclose(np.asarray(sae.encode(x)), acts_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(sae(x)), recon_ref, rtol=tol, atol=tol)


# -- Gemma Scope -------------------------------------------------------------------------------


def _gemma_params(rng, d=D, n=N):
    return {
        "W_enc": rng.normal(size=(d, n)).astype(np.float32),
        "W_dec": rng.normal(size=(n, d)).astype(np.float32),
        "b_enc": rng.normal(scale=0.3, size=n).astype(np.float32),
        "b_dec": rng.normal(scale=0.5, size=d).astype(np.float32),
        "threshold": rng.uniform(0.0, 1.5, size=n).astype(np.float32),
    }


def gemma_reference(x, p):
    f = {k: np.asarray(v, np.float64) for k, v in p.items()}
    pre = np.asarray(x, np.float64) @ f["W_enc"] + f["b_enc"]
    acts = (pre > f["threshold"]) * np.maximum(pre, 0)
    return acts, acts @ f["W_dec"] + f["b_dec"]


def _release_dir(tmp_path):
    return tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"


def test_gemma_scope_forward_and_provenance(tmp_path, rng):
    folder = _release_dir(tmp_path)
    folder.mkdir(parents=True)
    p = _gemma_params(rng)
    np.savez(folder / "params.npz", **p)
    x = rng.normal(size=(8, D)).astype(np.float32)
    for source in (folder, folder / "params.npz"):
        sae = load_sae(source)
        assert sae.config.activation == "jumprelu" and not sae.config.apply_b_dec_to_input
        acts, recon = gemma_reference(x, p)
        assert 0 < (acts > 0).mean() < 1
        _check(sae, x, acts, recon)
    meta = sae.config.meta
    assert meta["format"] == "gemma_scope" and meta["model_name"] == "gemma-2-2b"
    assert meta["hookpoint"] == "blocks.12.hook_resid_post"
    assert meta["canonical_hookpoint"] == "resid_post.12"
    assert (meta["layer"], meta["width"], meta["average_l0"]) == (12, "16k", 82)


def test_gemma_scope_square_and_lowercase_names(tmp_path, rng):
    """d_model == d_sae: no config to consult; Gemma Scope's documented layout decides."""
    p = _gemma_params(rng, 8, 8)
    np.savez(
        tmp_path / "params.npz",
        w_enc=p["W_enc"],
        w_dec=p["W_dec"],
        b_enc=p["b_enc"],
        b_dec=p["b_dec"],
        threshold=p["threshold"],
    )
    sae = load_gemma_scope(tmp_path, d_in=8, d_sae=8)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    acts, recon = gemma_reference(x, p)
    wrong, _ = gemma_reference(x, dict(p, W_enc=p["W_enc"].T))
    assert not np.allclose(acts, wrong, atol=1e-3)
    _check(sae, x, acts, recon)
    with pytest.raises(InputError, match="expected d_in=9"):
        load_gemma_scope(tmp_path, d_in=9)


def test_gemma_scope_bad_files(tmp_path, rng):
    p = _gemma_params(rng)
    np.savez(tmp_path / "params.npz", **{k: v for k, v in p.items() if k != "threshold"})
    with pytest.raises(InputError, match=r"missing tensor\(s\) \['threshold'\]"):
        load_gemma_scope(tmp_path)
    np.savez(tmp_path / "params.npz", **dict(p, threshold=p["threshold"][:-1]))
    with pytest.raises(InputError, match=r"'threshold' has shape \(9,\), expected \(10,\)"):
        load_gemma_scope(tmp_path)
    nan = dict(p)
    nan["b_enc"] = p["b_enc"].copy()
    nan["b_enc"][4] = np.nan
    np.savez(tmp_path / "params.npz", **nan)
    with pytest.raises(InputError, match="b_enc: 1 non-finite"):
        load_gemma_scope(tmp_path)
    # object arrays need pickle: refused, never unpickled
    np.savez(tmp_path / "params.npz", **dict(p, threshold=np.array([{"a": 1}], dtype=object)))
    with pytest.raises(InputError, match="object \\(pickled\\) arrays; refused") as e:
        load_gemma_scope(tmp_path)
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "params.npz", **p)
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or not an .npz archive"):
        load_gemma_scope(tmp_path)


# -- dictionary_learning -----------------------------------------------------------------------


def _linear(rng, n_out, n_in, bias=True):
    w = torch.from_numpy(rng.normal(size=(n_out, n_in)).astype(np.float32))
    b = torch.from_numpy(rng.normal(scale=0.3, size=n_out).astype(np.float32)) if bias else None
    return w, b


def _state_dict(rng, cls, d=D, n=N, k=3):
    """State dicts with the classes' own parameter and buffer names."""
    if cls in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "AutoEncoderNew"):
        enc_w, enc_b = _linear(rng, n, d)  # nn.Linear(activation_dim, dict_size)
        dec_w, dec_b = _linear(rng, d, n, bias=cls == "AutoEncoderNew")  # nn.Linear(dict, d)
        sd = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}
        bias = torch.from_numpy(rng.normal(scale=0.5, size=d).astype(np.float32))
        if cls == "AutoEncoder":
            sd["bias"] = bias
        elif cls == "AutoEncoderNew":
            sd["decoder.bias"] = dec_b
        else:
            sd.update(
                b_dec=bias,
                k=torch.tensor(k, dtype=torch.int),
                threshold=torch.tensor(0.4, dtype=torch.float32),
            )
        return sd
    sd = {
        "W_enc": torch.from_numpy(rng.normal(size=(d, n)).astype(np.float32)),
        "b_enc": torch.from_numpy(rng.normal(scale=0.3, size=n).astype(np.float32)),
        "W_dec": torch.from_numpy(
            rng.normal(size=(n, d)).astype(np.float32)
            * rng.uniform(0.2, 3.0, size=(n, 1)).astype(np.float32)
        ),
        "b_dec": torch.from_numpy(rng.normal(scale=0.5, size=d).astype(np.float32)),
    }
    if cls == "JumpReluAutoEncoder":
        sd["threshold"] = torch.from_numpy(rng.uniform(-0.2, 2.0, size=n).astype(np.float32))
    else:  # MatryoshkaBatchTopKSAE
        sd.update(
            k=torch.tensor(k, dtype=torch.int),
            threshold=torch.tensor(0.3),
            group_sizes=torch.tensor([2, 3, n - 5]),
        )
    return sd


def dl_reference(x, sd, cls, k=3):
    f = {key: v.double().numpy() for key, v in sd.items()}
    x = np.asarray(x, np.float64)
    if cls == "AutoEncoder":
        acts = np.maximum((x - f["bias"]) @ f["encoder.weight"].T + f["encoder.bias"], 0)
        return acts, acts @ f["decoder.weight"].T + f["bias"]
    if cls == "AutoEncoderNew":
        acts = np.maximum(x @ f["encoder.weight"].T + f["encoder.bias"], 0)
        return acts, acts @ f["decoder.weight"].T + f["decoder.bias"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ f["W_enc"] + f["b_enc"]
        norms = np.linalg.norm(f["W_dec"], axis=1)
        acts = np.maximum(pre * (pre > f["threshold"]), 0) * norms
        return acts, (acts / norms) @ f["W_dec"] + f["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = np.maximum((x - f["b_dec"]) @ f["W_enc"] + f["b_enc"], 0)
        acts = post * (post > f["threshold"])
        return acts, acts @ f["W_dec"] + f["b_dec"]
    post = np.maximum((x - f["b_dec"]) @ f["encoder.weight"].T + f["encoder.bias"], 0)
    if cls == "AutoEncoderTopK":
        idx = np.argsort(-post, axis=-1)[:, :k]
        acts = np.zeros_like(post)
        np.put_along_axis(acts, idx, np.take_along_axis(post, idx, -1), -1)
    else:  # BatchTopKSAE at inference: use_threshold=True
        acts = post * (post > f["threshold"])
    return acts, acts @ f["decoder.weight"].T + f["b_dec"]


def _save_dl(folder: pathlib.Path, sd, cls=None, k=3, d=D, n=N, **trainer):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ae.pt")
    if cls is not None:
        t = {
            "trainer_class": "X",
            "dict_class": cls,
            "activation_dim": d,
            "dict_size": n,
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "layer": 3,
            "submodule_name": "resid_post_layer_3",
            **trainer,
        }
        if "k" in sd:
            t["k"] = k
        (folder / "config.json").write_text(json.dumps({"trainer": t, "buffer": {"ctx_len": 128}}))
    return folder


CLASSES = [
    "AutoEncoder",
    "AutoEncoderNew",
    "JumpReluAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
]


@pytest.mark.parametrize("cls", CLASSES)
def test_dictionary_learning_forward_matches_reference(tmp_path, rng, cls):
    sd = _state_dict(rng, cls)
    folder = _save_dl(tmp_path / cls, sd, cls)
    assert detect_format(folder) == "dictionary_learning"
    sae = load_sae(folder)
    x = rng.normal(size=(32, D)).astype(np.float32)
    acts, recon = dl_reference(x, sd, cls)
    assert 0 < (acts > 0).mean() < 1
    _check(sae, x, acts, recon)
    meta = sae.config.meta
    assert meta["dict_class"] == cls and meta["format"] == "dictionary_learning"
    assert meta["model_name"] == "EleutherAI/pythia-70m-deduped"
    assert meta["hookpoint"] == "resid_post_layer_3"
    assert meta["canonical_hookpoint"] == "resid_post.3"
    # and the same SAE survives a SAELens round trip bit for bit
    back = load_saelens(save_saelens(tmp_path / "rt", sae), record_provenance=False)
    assert back.config == sae.config
    for key, value in sae.to_numpy().items():
        np.testing.assert_array_equal(np.asarray(getattr(back, key)), value)


def test_square_autoencoder_without_config(tmp_path, rng):
    """No config.json: the class is found from the tensor names and, with activation_dim ==
    dict_size, nn.Linear's [out, in] layout decides the orientation."""
    sd = _state_dict(rng, "AutoEncoder", d=8, n=8)
    folder = _save_dl(tmp_path / "sq", sd)
    sae = load_dictionary_learning(folder / "ae.pt")
    x = rng.normal(size=(5, 8)).astype(np.float32)
    acts, recon = dl_reference(x, sd, "AutoEncoder")
    wrong, _ = dl_reference(
        x, dict(sd, **{"encoder.weight": sd["encoder.weight"].T}), "AutoEncoder"
    )
    assert not np.allclose(acts, wrong, atol=1e-3)
    _check(sae, x, acts, recon)


def test_topk_vs_batchtopk_needs_config(tmp_path, rng):
    sd = _state_dict(rng, "AutoEncoderTopK")
    folder = _save_dl(tmp_path / "amb", sd)
    with pytest.raises(InputError, match="fits both AutoEncoderTopK and BatchTopKSAE"):
        load_sae(folder)
    sae = load_sae(folder, dict_class="AutoEncoderTopK")
    x = rng.normal(size=(4, D)).astype(np.float32)
    _check(sae, x, *dl_reference(x, sd, "AutoEncoderTopK"))


def test_compiled_state_dict_prefix(tmp_path, rng):
    sd = _state_dict(rng, "AutoEncoder")
    folder = _save_dl(tmp_path / "c", {"_orig_mod." + k: v for k, v in sd.items()}, "AutoEncoder")
    x = rng.normal(size=(4, D)).astype(np.float32)
    _check(load_sae(folder), x, *dl_reference(x, sd, "AutoEncoder"))


class _Payload:
    """Unpickling this object would create a marker file (what a malicious .pt could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_only_file_refused_without_executing(tmp_path, rng):
    sd = _state_dict(rng, "AutoEncoder")
    marker = tmp_path / "payload_ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({**sd, "extra": _Payload(marker)}, folder / "ae.pt")
    with pytest.raises(InputError, match=r"needs arbitrary unpickling, which is refused") as e:
        load_sae(folder)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_bad_dictionary_learning_files(tmp_path, rng):
    sd = _state_dict(rng, "AutoEncoder")
    folder = _save_dl(tmp_path / "t", sd, "AutoEncoder")
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or not a torch file") as e:
        load_sae(folder)
    assert "\n" not in str(e.value)

    gated = {
        "encoder.weight": torch.zeros(N, D),
        "decoder.weight": torch.zeros(D, N),
        "decoder_bias": torch.zeros(D),
        "r_mag": torch.zeros(N),
        "gate_bias": torch.zeros(N),
        "mag_bias": torch.zeros(N),
    }
    with pytest.raises(InputError, match="GatedAutoEncoder is not supported"):
        load_sae(_save_dl(tmp_path / "g", gated))
    with pytest.raises(InputError, match="unknown dict_class 'Mystery'"):
        load_sae(_save_dl(tmp_path / "u", sd, "Mystery"))

    wrong = dict(sd, bias=torch.zeros(D + 1))
    with pytest.raises(InputError, match=r"'bias' has shape \(7,\), expected \(6,\)"):
        load_sae(_save_dl(tmp_path / "w", wrong, "AutoEncoder"))

    topk = _state_dict(rng, "AutoEncoderTopK", k=3)
    with pytest.raises(InputError, match="config.json k=5 disagrees with the state dict's k=3"):
        load_sae(_save_dl(tmp_path / "k", topk, "AutoEncoderTopK", k=5))

    nan = dict(sd)
    nan["decoder.weight"] = sd["decoder.weight"].clone()
    nan["decoder.weight"][0, 0] = float("nan")
    with pytest.raises(InputError, match="W_dec: 1 non-finite"):
        load_sae(_save_dl(tmp_path / "n", nan, "AutoEncoder"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot tell the SAE format"):
        load_sae(tmp_path / "empty")
