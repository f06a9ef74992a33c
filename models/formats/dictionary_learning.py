"""dictionary_learning (saprmarks/dictionary_learning) format: ``ae.pt`` (a torch state dict)
+ ``config.json`` (``{"trainer": {"dict_class", "activation_dim", "dict_size", "k",
"lm_name", "layer", "submodule_name", ...}, "buffer": {...}}``).

``ae.pt`` is read with ``torch.load(weights_only=True)`` only: a file that needs arbitrary
unpickling is refused, never executed. Classes and their forward passes
(``dictionary.py`` / ``trainers/*.py``; docs/references.md "SAE file formats"):

============================  =========================================================  ====
class                         state dict -> forward                                      type
============================  =========================================================  ====
AutoEncoder                   ``encoder.weight [dict, d]``, ``encoder.bias``,            relu
                              ``decoder.weight [d, dict]``, ``bias [d]``:
                              ``relu(enc(x - bias))``, ``dec(f) + bias``
AutoEncoderNew                ``encoder.*``, ``decoder.weight``, ``decoder.bias``:       relu
                              ``relu(enc(x))``, ``dec(f)`` (no input centring)
JumpReluAutoEncoder           ``W_enc [d, dict]``, ``b_enc``, ``W_dec [dict, d]``,       jump
                              ``b_dec``, ``threshold [dict]``: ``pre = x @ W_enc +
                              b_enc``; ``f = relu(pre * (pre > thr)) * ||W_dec_i||``;
                              decode ``(f / ||W_dec_i||) @ W_dec + b_dec``
AutoEncoderTopK               ``encoder.*``, ``decoder.weight``, ``b_dec``, buffers      topk
                              ``k``, ``threshold`` (scalar): top-k of
                              ``relu(enc(x - b_dec))``, ``dec(f) + b_dec``
BatchTopKSAE                  same tensors; inference ``encode(use_threshold=True)``:    btk
                              ``relu(enc(x - b_dec))`` kept where ``> threshold``
MatryoshkaBatchTopKSAE        ``W_enc [d, dict]``, ``b_enc``, ``W_dec``, ``b_dec``,      btk
                              ``k``, ``threshold``, ``group_sizes``: as BatchTopK
============================  =========================================================  ====

JumpReLU's decoder-norm scaling is folded into the weights (``W_enc``, ``b_enc``, threshold
times the norms, ``W_dec`` rows divided), which reproduces ``encode`` and ``decode`` exactly
in math. Weights are used as saved: this loader never renormalises the decoder (the
library's ``from_pretrained`` did in some versions, which rescales latents, docs/references.md).
Orientation comes from ``activation_dim`` / ``dict_size`` in config.json (or, without it,
from the 1-D biases); for ``activation_dim == dict_size`` the class's documented layout
(``nn.Linear`` weights are ``[out, in]``) decides. GatedAutoEncoder and crosscoders are
refused (not expressible in the SAE type). AutoEncoderTopK and BatchTopKSAE have identical
state dicts: without config.json, ``dict_class`` must be given.
"""

from __future__ import annotations

import pathlib
import pickle

import numpy as np

from models import sae as sae_lib
from models.formats import _common as C
from models.formats._common import InputError

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"

_LAYOUTS = {
    "AutoEncoder": ({"encoder.weight", "encoder.bias", "decoder.weight", "bias"}, set()),
    "AutoEncoderNew": ({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}, set()),
    "JumpReluAutoEncoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, set()),
    "AutoEncoderTopK": (
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"},
        {"threshold"},
    ),
    "BatchTopKSAE": (
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
        set(),
    ),
    "MatryoshkaBatchTopKSAE": (
        {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
        set(),
    ),
}
_UNSUPPORTED = {
    "GatedAutoEncoder": "separate gate and magnitude paths (r_mag, gate_bias, mag_bias)",
    "CrossCoder": "several layers per feature",
    "JumpAutoEncoder": "an additive jump per feature",
}


def _torch_load(path: pathlib.Path, what: str) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors; never unpickles objects."""
    import torch

    C.require_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise InputError(
                f"{what}: {path} cannot be loaded with torch.load(weights_only="
                f"True): it needs arbitrary unpickling, which is refused "
                f"(re-save it as a plain state dict of tensors)"
            ) from None
        raise InputError(f"{what}: {path} is not a readable torch file ({first})") from None
    except Exception as e:  # noqa: BLE001 - garbage bytes make torch's weights-only
        # unpickler raise anything (EOFError, RuntimeError, IndexError on random bytes, ...);
        # it never runs code, so every failure is "not a torch file", said in one line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(
            f"{what}: {path} is truncated or not a torch file (torch.load failed: {first})"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kinds = (
            sorted({type(v).__name__ for v in obj.values()})
            if isinstance(obj, dict)
            else type(obj).__name__
        )
        raise InputError(f"{what}: {path} must hold a state dict of tensors, got {kinds}")
    out = {}
    for key, value in obj.items():
        # torch.compile'd modules save their parameters under `_orig_mod.`
        key = key[len("_orig_mod.") :] if key.startswith("_orig_mod.") else key
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy()
    return out


def _detect_class(keys: set[str], what: str) -> str:
    if {"r_mag", "gate_bias", "mag_bias"} & keys:
        return "GatedAutoEncoder"
    if "jump" in keys:
        return "JumpAutoEncoder"
    matches = [name for name, (req, opt) in _LAYOUTS.items() if req <= keys <= req | opt]
    if matches == ["AutoEncoderTopK", "BatchTopKSAE"]:
        raise InputError(
            f"{what}: the state dict fits both AutoEncoderTopK and BatchTopKSAE "
            f"(identical tensors, different forward); provide config.json or "
            f"pass dict_class="
        )
    if len(matches) != 1:
        raise InputError(
            f"{what}: tensors {sorted(keys)} match no known dictionary_learning "
            f"class ({sorted(_LAYOUTS)})"
        )
    return matches[0]


def _scalar(tensors: dict, key: str, what: str) -> float:
    arr = np.asarray(tensors[key])
    if arr.size != 1:
        raise InputError(f"{what}: {key!r} must be a scalar buffer, got shape {arr.shape}")
    return arr.reshape(()).item()


def load_dictionary_learning(
    path: C.PathLike,
    *,
    dict_class: str | None = None,
    hookpoint: str | None = None,
    model_name: str | None = None,
    allow_transposed: bool = True,
    record_provenance: bool = True,
) -> sae_lib.SAE:
    """Loads a dictionary_learning ``ae.pt`` (+ sibling ``config.json``) into the SAE type.

    Args:
      path: the folder holding ``ae.pt`` or the ``.pt`` file itself.
      dict_class: class name when config.json is absent or lacks ``dict_class``.
      hookpoint, model_name: provenance overrides (default: config's ``submodule_name`` /
        ``lm_name``).
      allow_transposed: accept a matrix stored in the other orientation when the shape says
        so unambiguously (recorded in metadata); False refuses it.
      record_provenance: add format / source path / hookpoint / model to the metadata.
    """
    file = pathlib.Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    what = f"dictionary_learning SAE {file}"
    config = {}
    if (file.parent / CONFIG_FILE).is_file():
        config = C.read_json(file.parent / CONFIG_FILE, what)
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    tensors = _torch_load(file, what)

    name = dict_class or trainer.get("dict_class") or _detect_class(set(tensors), what)
    if name in _UNSUPPORTED:
        raise InputError(f"{what}: {name} is not supported (it needs {_UNSUPPORTED[name]})")
    if name not in _LAYOUTS:
        raise InputError(f"{what}: unknown dict_class {name!r}; supported: {sorted(_LAYOUTS)}")
    required, optional = _LAYOUTS[name]
    C.check_keys(tensors, sorted(required), optional, what)

    linear = "encoder.weight" in required
    bias_key = {"AutoEncoder": "bias", "AutoEncoderNew": "decoder.bias"}.get(name, "b_dec")
    enc_bias_key = "encoder.bias" if linear else "b_enc"
    if "activation_dim" in trainer:
        d = C.config_int(trainer, "activation_dim", what)
        n = C.config_int(trainer, "dict_size", what)
        dims = f"config.json (activation_dim={d}, dict_size={n})"
    else:
        d, n = int(np.shape(tensors[bias_key])[0]), int(np.shape(tensors[enc_bias_key])[0])
        dims = f"bias lengths (activation_dim={d}, dict_size={n})"

    transposed: list[str] | None = [] if allow_transposed else None
    if linear:
        # nn.Linear weights are [out, in]: encoder.weight [dict, d], decoder.weight [d, dict].
        w_enc = np.asarray(C.matrix(tensors, "encoder.weight", n, d, what, dims, transposed)).T
        w_dec = np.asarray(C.matrix(tensors, "decoder.weight", d, n, what, dims, transposed)).T
    else:
        w_enc = C.matrix(tensors, "W_enc", d, n, what, dims, transposed)
        w_dec = C.matrix(tensors, "W_dec", n, d, what, dims, transposed)
    arrays = {
        "W_enc": w_enc,
        "b_enc": C.vector(tensors, enc_bias_key, n, what, dims),
        "W_dec": w_dec,
        "b_dec": C.vector(tensors, bias_key, d, what, dims),
    }
    extra: dict = {"dict_class": name}

    k = 0
    apply_b_dec = name != "AutoEncoderNew"
    if name in ("AutoEncoder", "AutoEncoderNew"):
        activation = "relu"
    elif name == "JumpReluAutoEncoder":
        activation = "jumprelu"
        apply_b_dec = bool(trainer.get("apply_b_dec_to_input", False))
        threshold = np.asarray(C.vector(tensors, "threshold", n, what, dims), np.float64)
        C.checks.check_finite(f"{what}: W_dec", w_dec)
        norms = C.decoder_row_norms(w_dec, what)
        arrays["W_enc"] = np.asarray(w_enc, np.float64) * norms[None, :]
        arrays["b_enc"] = np.asarray(arrays["b_enc"], np.float64) * norms
        arrays["W_dec"] = np.asarray(w_dec, np.float64) / norms[:, None]
        # f = relu(pre) * 1[pre > thr] * norm; with pre' = pre * norm the gate is pre' > thr *
        # norm (norms are positive), so the folded threshold is thr * norm.
        arrays["threshold"] = threshold * norms
        extra["folded_decoder_norm"] = True
    else:
        k = C.config_int({"k": _scalar(tensors, "k", what)}, "k", what)
        if "k" in trainer and C.config_int(trainer, "k", what) != k:
            raise InputError(
                f"{what}: config.json k={trainer['k']} disagrees with the state dict's k={k}"
            )
        thr = _scalar(tensors, "threshold", what) if "threshold" in tensors else None
        if thr is not None and not np.isfinite(thr):
            raise InputError(f"{what}: threshold buffer is not finite ({thr})")
        if name == "AutoEncoderTopK":
            activation = "topk"
            extra["inference_threshold"] = thr  # used only by encode(use_threshold=True)
        else:
            activation = "batchtopk"
            arrays["threshold"] = np.full((n,), thr, np.float64)
            if name == "MatryoshkaBatchTopKSAE":
                sizes = np.asarray(tensors["group_sizes"]).astype(np.int64).reshape(-1)
                if sizes.sum() != n or np.any(sizes <= 0):
                    raise InputError(
                        f"{what}: group_sizes {sizes.tolist()} must be positive "
                        f"and sum to dict_size={n}"
                    )
                extra["group_sizes"] = sizes.tolist()

    sae_cfg = C.make_config(
        what, d_in=d, d_sae=n, activation=activation, k=k, apply_b_dec_to_input=apply_b_dec
    )
    hook = hookpoint or trainer.get("submodule_name")
    if not hook and trainer.get("layer") is not None:
        hook = f"layer_{trainer['layer']}"
    model = model_name or trainer.get("lm_name")
    extra.update(
        layer=trainer.get("layer"),
        trainer_class=trainer.get("trainer_class"),
        transposed_on_load=transposed or None,
    )
    prov = C.provenance("dictionary_learning", file, hook, model, **extra)
    return C.build(sae_cfg, arrays, prov, what, record_provenance)
