"""SAELens format: ``cfg.json`` + ``sae_weights.safetensors`` (+ optional ``sparsity.safetensors``).

Read (docs/references.md "SAE file formats"; SAELens ``sae_lens/saes/*.py`` and
``loading/pretrained_sae_loaders.py``):

* v6 configs: ``d_in``, ``d_sae``, ``architecture``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``k`` / ``rescale_acts_by_decoder_norm`` (topk), model and hook
  under ``metadata``. Pre-6.0 configs (no ``sae_lens_version`` >= 6): model/hook info at the top
  level, ``hook_point`` -> ``hook_name``, ``activation_fn_str`` -> ``activation_fn``, topk via
  ``activation_fn_kwargs.k``, boolean ``normalize_activations``, ``finetuning_scaling_factor``.
* Forward per architecture (inference): ``sae_in = x - b_dec * apply_b_dec_to_input``,
  ``pre = sae_in @ W_enc + b_enc``; standard ``relu(pre)``; topk: the k largest of ``pre``,
  ReLU'd (= top-k of ``relu(pre)``); jumprelu ``relu(pre) * (pre > relu(threshold))``;
  ``x_hat = acts @ W_dec + b_dec``. ``batchtopk`` / ``matryoshka_batchtopk`` configs are
  training checkpoints whose inference form is JumpReLU with the learned ``topk_threshold``
  (SAELens saves them as jumprelu); they load as activation ``batchtopk`` with that threshold.
* ``rescale_acts_by_decoder_norm`` (topk; default True for batchtopk training configs):
  ``pre`` is multiplied by the decoder row norms before the activation and activations are
  divided by them before decoding. It is folded into the weights on load (``W_enc`` and
  ``b_enc`` columns times the norms, ``W_dec`` rows divided), which gives the same
  activations and reconstructions (SAELens ``_fold_norm_topk`` does the same).
* ``normalize_activations``: ``none``; ``expected_average_only_in`` is a constant input scale
  that SAELens folds in only when it knows the factor (``norm_scaling_factor`` argument here,
  -> ``SAEConfig.input_scale``; without it the forward is the same as SAELens's on-disk
  load, which applies nothing); ``constant_norm_rescale`` and ``layer_norm`` are per-token
  normalisations the SAE type does not represent: refused unless ``ignore_runtime_norm``.

Write (`save_saelens`): a v6 config that SAELens itself can load, plus a ``sae_universality``
block (ignored by SAELens, which filters unknown keys) holding the exact `SAEConfig`, so
``load_saelens(save_saelens(path, sae))`` returns bit-identical weights and an equal config
(up to the provenance keys ``format`` / ``source_path``, which describe the file read) for an
SAE without input scale; an input scale is folded into the written weights (SAELens does not
apply it at inference), so such an SAE reads back as the equivalent folded SAE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from models import sae as sae_lib
from models.formats import _common as C
from models.formats._common import InputError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
BLOCK_KEY = "sae_universality"
BLOCK_VERSION = 1
WRITTEN_SAELENS_VERSION = "6.0.0"

ARCHITECTURES = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "batchtopk",
}
# Known SAELens architectures whose forward the SAE type cannot express.
UNSUPPORTED = {
    "gated": "separate gate and magnitude pre-activations (b_gate, b_mag, r_mag)",
    "transcoder": "a decoder into another hookpoint (d_out)",
    "skip_transcoder": "a decoder into another hookpoint plus a skip matrix",
    "jumprelu_transcoder": "a decoder into another hookpoint (d_out)",
    "jumprelu_skip_transcoder": "a decoder into another hookpoint plus a skip matrix",
    "matching_pursuit": "an iterative encoder",
    "temporal": "a context-dependent encoder",
    "phase_multiplexed": "a multiplexed encoder",
}
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_PRE6_RENAMES = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
_META_KEYS = (
    "dataset_path",
    "context_size",
    "prepend_bos",
    "hook_head_index",
    "sae_lens_version",
    "sae_lens_training_version",
    "neuronpedia_id",
)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _normalise_cfg(raw: dict, what: str) -> dict:
    """One dict for v6 and pre-6.0 configs: architecture, k, flags, model/hook metadata."""
    meta_in = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("sae_lens_version") or meta_in.get("sae_lens_version")
    # SAELens's own rule is "no version or < 6.0 -> pre-6.0"; a versionless config that has
    # a metadata object (third-party v6-style writers) is read as v6.
    pre6 = _version_tuple(version) < (6,) if version else not meta_in
    cfg = {_PRE6_RENAMES.get(k, k): v for k, v in raw.items()} if pre6 else dict(raw)
    arch = cfg.get("architecture") or "standard"
    k = cfg.get("k")
    if pre6:
        act = cfg.get("activation_fn") or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if act == "topk":
            if kwargs.get("k") is None:
                raise InputError(f"{what}: activation_fn 'topk' without activation_fn_kwargs.k")
            arch, k = "topk", kwargs["k"]
        elif act != "relu" and arch == "standard":
            raise InputError(
                f"{what}: pre-6.0 activation_fn {act!r} is not supported; expected 'relu' or 'topk'"
            )
        norm = cfg.get("normalize_activations")
        if isinstance(norm, bool):
            norm = "expected_average_only_in" if norm else "none"
        cfg["normalize_activations"] = norm or "none"
        meta = {
            key: cfg.get(key)
            for key in ("model_name", "hook_name", "hook_layer", *_META_KEYS)
            if cfg.get(key) is not None
        }
    else:
        meta = dict(meta_in)
    cfg["normalize_activations"] = cfg.get("normalize_activations") or "none"
    return {
        "architecture": arch,
        "k": k,
        "meta": meta,
        "pre6": pre6,
        "raw": cfg,
        "version": version,
    }


def _fold_decoder_norm(arrays: dict, what: str) -> None:
    """Folds ``rescale_acts_by_decoder_norm``: same activations and reconstructions."""
    norms = C.decoder_row_norms(arrays["W_dec"], what)
    arrays["W_enc"] = np.asarray(arrays["W_enc"], np.float64) * norms[None, :]
    arrays["b_enc"] = np.asarray(arrays["b_enc"], np.float64) * norms
    arrays["W_dec"] = np.asarray(arrays["W_dec"], np.float64) / norms[:, None]


def _thaw(value):
    """Frozen metadata (tuples) -> JSON lists."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return C._jsonable(value)


def _block_config(block: dict, what: str) -> sae_lib.SAEConfig:
    """The exact SAEConfig written by `save_saelens`."""
    if block.get("format_version") != BLOCK_VERSION or not isinstance(block.get("config"), dict):
        raise InputError(
            f"{what}: unknown {BLOCK_KEY!r} block version "
            f"{block.get('format_version')!r}; expected {BLOCK_VERSION}"
        )
    names = {f.name for f in dataclasses.fields(sae_lib.SAEConfig)} - {"metadata"}
    fields = {k: v for k, v in block["config"].items() if k in names}
    cfg = C.make_config(what, **fields)
    pairs = block.get("metadata") or []
    try:
        meta = {str(k): v for k, v in pairs}
    except (TypeError, ValueError):
        raise InputError(
            f"{what}: {BLOCK_KEY}.metadata must be a list of [key, value] pairs"
        ) from None
    return cfg.with_metadata(**meta) if meta else cfg


def load_saelens(
    path: C.PathLike,
    *,
    norm_scaling_factor: float | None = None,
    ignore_runtime_norm: bool = False,
    allow_transposed: bool = True,
    hookpoint: str | None = None,
    model_name: str | None = None,
    record_provenance: bool = True,
) -> sae_lib.SAE:
    """Loads a SAELens SAE folder (or its cfg.json / weights file) into the SAE type.

    Args:
      path: folder holding ``cfg.json`` and ``sae_weights.safetensors`` (a path to either
        file is accepted too).
      norm_scaling_factor: the constant of ``normalize_activations="expected_average_only_in"``
        (SAELens's pretrained directory lists it per release); becomes ``input_scale``.
      ignore_runtime_norm: load SAEs with per-token ``constant_norm_rescale`` / ``layer_norm``
        anyway (weights are right; encode/decode then omit that normalisation: the metadata
        key ``ignored_normalization`` says so). Refused by default.
      allow_transposed: accept a matrix stored in the other orientation when the shape says so
        unambiguously (recorded as metadata ``transposed_on_load``); False refuses it.
      hookpoint, model_name: override what the config says (provenance only).
      record_provenance: add format / source path / hookpoint / model to the metadata.

    Returns:
      A validated `models.sae.SAE`.
    """
    folder = pathlib.Path(path)
    if folder.is_file():
        folder = folder.parent
    what = f"SAELens SAE {folder}"
    raw = C.read_json(folder / CFG_FILE, what)
    tensors, _ = C.read_safetensors(folder / WEIGHTS_FILE, what)
    block = raw.get(BLOCK_KEY)
    if isinstance(block, dict):
        return _load_own(folder, raw, block, tensors, what, record_provenance)

    info = _normalise_cfg(raw, what)
    cfg = info["raw"]
    arch = info["architecture"]
    if arch in UNSUPPORTED:
        raise InputError(
            f"{what}: architecture {arch!r} is not supported (it needs "
            f"{UNSUPPORTED[arch]}); supported: {sorted(ARCHITECTURES)}"
        )
    if arch not in ARCHITECTURES:
        raise InputError(
            f"{what}: unknown architecture {arch!r}; supported: {sorted(ARCHITECTURES)}"
        )
    activation = ARCHITECTURES[arch]
    d_in = C.config_int(cfg, "d_in", what)
    d_sae = C.config_int(cfg, "d_sae", what)
    dims = f"cfg.json (d_in={d_in}, d_sae={d_sae})"

    norm = cfg["normalize_activations"]
    if norm not in NORMALIZATIONS:
        raise InputError(
            f"{what}: unknown normalize_activations {norm!r}; expected one of {NORMALIZATIONS}"
        )
    extra_meta: dict[str, Any] = {"normalize_activations": norm}
    input_scale = 1.0
    if norm in ("constant_norm_rescale", "layer_norm"):
        if not ignore_runtime_norm:
            raise InputError(
                f"{what}: normalize_activations={norm!r} is a per-token "
                f"normalisation the SAE type does not represent; pass "
                f"ignore_runtime_norm=True to load the weights anyway"
            )
        extra_meta["ignored_normalization"] = norm
    elif norm == "expected_average_only_in":
        if norm_scaling_factor is not None:
            if not (np.isfinite(norm_scaling_factor) and norm_scaling_factor > 0):
                raise InputError(
                    f"{what}: norm_scaling_factor must be positive and finite, "
                    f"got {norm_scaling_factor!r}"
                )
            input_scale = float(norm_scaling_factor)
        else:
            C.log.warning(
                "%s: normalize_activations='expected_average_only_in' without "
                "norm_scaling_factor: inputs are not rescaled (as SAELens's "
                "load_from_disk)",
                what,
            )
            extra_meta["norm_scaling_factor_missing"] = True

    k = 0
    if activation in ("topk", "batchtopk"):
        k_raw = info["k"]
        if activation == "batchtopk" and isinstance(k_raw, float) and k_raw != int(k_raw):
            # BatchTopK's k is a batch average and may be fractional; inference uses the
            # threshold, so keep the rounded k and the exact one in the metadata.
            extra_meta["k_average"] = k_raw
            k_raw = max(1, round(k_raw))
        k = C.config_int({"k": k_raw}, "k", what)

    required = ["W_enc", "b_enc", "W_dec", "b_dec"]
    optional = {"threshold", "scaling_factor", "finetuning_scaling_factor"}
    if activation == "jumprelu":
        optional |= {"log_threshold"}
    if activation == "batchtopk":
        optional |= {"topk_threshold"}
    C.check_keys(tensors, required, optional, what)
    transposed: list[str] | None = [] if allow_transposed else None
    arrays = {
        "W_enc": C.matrix(tensors, "W_enc", d_in, d_sae, what, dims, transposed),
        "b_enc": C.vector(tensors, "b_enc", d_sae, what, dims),
        "W_dec": C.matrix(tensors, "W_dec", d_sae, d_in, what, dims, transposed),
        "b_dec": C.vector(tensors, "b_dec", d_in, what, dims),
    }
    if "threshold" in tensors:
        arrays["threshold"] = C.vector(tensors, "threshold", d_sae, what, dims)
    elif "log_threshold" in tensors:
        arrays["threshold"] = np.exp(
            np.asarray(C.vector(tensors, "log_threshold", d_sae, what, dims), np.float64)
        )
    elif "topk_threshold" in tensors:
        thr = np.asarray(tensors["topk_threshold"], np.float64)
        if thr.size != 1:
            raise InputError(f"{what}: topk_threshold must be a scalar, got shape {thr.shape}")
        arrays["threshold"] = np.full((d_sae,), float(thr.reshape(())))
    elif activation in ("jumprelu", "batchtopk"):
        raise InputError(
            f"{what}: architecture {arch!r} needs a 'threshold' tensor "
            f"[{d_sae}]; found {sorted(tensors)}"
        )

    for key in ("finetuning_scaling_factor", "scaling_factor"):
        if key in tensors:
            scale = np.asarray(C.vector(tensors, key, d_sae, what, dims), np.float64)
            C.checks.check_finite(f"{what}: {key}", scale)
            if not np.all(scale == 1.0):
                # Pre-6.0 decode multiplies activations by this per-feature factor; folding it
                # into the decoder rows gives the same reconstruction.
                arrays["W_dec"] = scale[:, None] * np.asarray(arrays["W_dec"], np.float64)
                extra_meta["folded_finetuning_scaling_factor"] = True

    rescale = cfg.get("rescale_acts_by_decoder_norm", arch in ("batchtopk", "matryoshka_batchtopk"))
    if activation in ("topk", "batchtopk") and rescale:
        C.checks.check_finite(f"{what}: W_dec", arrays["W_dec"])
        _fold_decoder_norm(arrays, what)
        extra_meta["folded_decoder_norm"] = True
    if transposed:
        extra_meta["transposed_on_load"] = transposed
    if cfg.get("reshape_activations") not in (None, "none"):
        # e.g. hook_z: inputs are [..., n_heads, d_head] flattened to d_in by the caller
        extra_meta["reshape_activations"] = cfg["reshape_activations"]

    meta = info["meta"]
    sae_cfg = C.make_config(
        what,
        d_in=d_in,
        d_sae=d_sae,
        activation=activation,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        input_scale=input_scale,
    )
    source_meta = {key: meta.get(key) for key in _META_KEYS if meta.get(key) is not None}
    prov = C.provenance(
        "saelens",
        folder,
        hookpoint or meta.get("hook_name"),
        model_name or meta.get("model_name"),
        architecture=arch,
        saelens_config_version="pre-6.0" if info["pre6"] else "6",
        has_sparsity=(folder / SPARSITY_FILE).is_file() or None,
        **source_meta,
        **extra_meta,
    )
    return C.build(sae_cfg, arrays, prov, what, record_provenance)


def _load_own(
    folder: pathlib.Path, raw: dict, block: dict, tensors: dict, what: str, record_provenance: bool
) -> sae_lib.SAE:
    """Files written by `save_saelens`: the exact config, weights as stored."""
    cfg = _block_config(block, what)
    for key in ("d_in", "d_sae", "apply_b_dec_to_input"):
        if key in raw and raw[key] != getattr(cfg, key):
            raise InputError(
                f"{what}: cfg.json {key}={raw[key]!r} disagrees with its "
                f"{BLOCK_KEY} block ({getattr(cfg, key)!r}); the file was edited"
            )
    dims = f"cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
    C.check_keys(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"], {"threshold"}, what)
    arrays = {
        "W_enc": C.matrix(tensors, "W_enc", cfg.d_in, cfg.d_sae, what, dims),
        "b_enc": C.vector(tensors, "b_enc", cfg.d_sae, what, dims),
        "W_dec": C.matrix(tensors, "W_dec", cfg.d_sae, cfg.d_in, what, dims),
        "b_dec": C.vector(tensors, "b_dec", cfg.d_in, what, dims),
    }
    if "threshold" in tensors:
        arrays["threshold"] = C.vector(tensors, "threshold", cfg.d_sae, what, dims)
    prov = {"format": "saelens", "source_path": str(folder.resolve())}
    return C.build(cfg, arrays, prov, what, record_provenance)


def read_saelens_sparsity(path: C.PathLike) -> np.ndarray | None:
    """The ``sparsity`` tensor (log10 feature density, ``[d_sae]``) or None when absent."""
    folder = pathlib.Path(path)
    if folder.is_file():
        folder = folder.parent
    file = folder / SPARSITY_FILE
    if not file.is_file():
        return None
    what = f"SAELens sparsity {file}"
    raw = C.read_json(folder / CFG_FILE, f"SAELens SAE {folder}")
    d_sae = C.config_int(raw, "d_sae", what)
    tensors, _ = C.read_safetensors(file, what)
    C.check_keys(tensors, ["sparsity"], (), what)
    values = np.array(
        C.vector(tensors, "sparsity", d_sae, what, f"cfg.json (d_sae={d_sae})"), np.float32
    )
    if np.isnan(values).any():
        raise InputError(f"{what}: {int(np.isnan(values).sum())} NaN value(s) in 'sparsity'")
    return values


_WRITE_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}


def save_saelens(path: C.PathLike, sae: sae_lib.SAE, *, sparsity: Any = None) -> pathlib.Path:
    """Writes ``sae`` as a SAELens v6 folder (cfg.json, sae_weights.safetensors, optional
    sparsity.safetensors) and returns the folder.

    BatchTopK is written as SAELens's inference form, ``jumprelu`` with the threshold. An
    ``input_scale`` s other than 1 is ALWAYS folded into the weights (SAELens's
    ``fold_activation_norm_scaling_factor``): SAELens's inference forward does not apply
    ``normalize_activations="expected_average_only_in"``, so an unfolded file read by SAELens
    gives wrong reconstructions (measured: off by up to 5.2 on a scale of 12.3). With
    ``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s`` (``b_enc`` and the
    thresholds unchanged): ``(x - b_dec') W_enc' + b_enc = (s x - b_dec) W_enc + b_enc``, the
    same pre-activations, hence the same ReLU / TopK / JumpReLU / BatchTopK-threshold
    activations, and ``acts W_dec' + b_dec' = (acts W_dec + b_dec) / s``, the same
    reconstruction (with or without ``apply_b_dec_to_input``). The file then says
    ``normalize_activations="none"`` and loads back as the folded SAE (``input_scale`` 1,
    ``metadata["folded_input_scale"] = s``): the same function up to float32 rounding.

    Files are written to temporary names and renamed, so a killed save leaves no half file.
    """
    sae.validate("save_saelens")
    cfg = sae.config
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, np.float32) for k, v in sae.to_numpy().items()}
    scale = float(cfg.input_scale)
    if scale != 1.0:
        arrays["W_enc"] = (arrays["W_enc"].astype(np.float64) * scale).astype(np.float32)
        arrays["W_dec"] = (arrays["W_dec"].astype(np.float64) / scale).astype(np.float32)
        arrays["b_dec"] = (arrays["b_dec"].astype(np.float64) / scale).astype(np.float32)
        cfg = dataclasses.replace(cfg, input_scale=1.0).with_metadata(folded_input_scale=scale)
    weights = {k: arrays[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.activation in ("jumprelu", "batchtopk"):
        weights["threshold"] = arrays["threshold"]
    elif np.any(arrays["threshold"] != 0):
        C.log.warning(
            "save_saelens: %s SAE has a non-zero (unused) threshold; it is saved, "
            "and SAELens's strict loader will reject the extra tensor",
            cfg.activation,
        )
        weights["threshold"] = arrays["threshold"]

    meta = cfg.meta
    saelens_meta = {
        "sae_lens_version": WRITTEN_SAELENS_VERSION,
        "sae_lens_training_version": WRITTEN_SAELENS_VERSION,
    }
    if meta.get("model_name") is not None:
        saelens_meta["model_name"] = meta["model_name"]
    if meta.get("hookpoint") is not None:
        saelens_meta["hook_name"] = meta["hookpoint"]
    out_cfg: dict[str, Any] = {
        "architecture": _WRITE_ARCH[cfg.activation],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": saelens_meta,
    }
    if cfg.activation == "topk":
        out_cfg.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "metadata"}
    out_cfg[BLOCK_KEY] = {
        "format_version": BLOCK_VERSION,
        "config": C._jsonable(fields),
        "metadata": [[k, _thaw(v)] for k, v in cfg.metadata],
    }
    if sparsity is not None:
        sp = np.asarray(sparsity, np.float32)
        C.checks.check_shape("save_saelens sparsity", sp, (cfg.d_sae,))
        if np.isnan(sp).any():
            raise InputError("save_saelens sparsity: NaN values; expected log10 densities")

    _atomic(folder / WEIGHTS_FILE, lambda p: C.write_safetensors(p, weights))
    if sparsity is not None:
        _atomic(folder / SPARSITY_FILE, lambda p: C.write_safetensors(p, {"sparsity": sp}))
    _atomic(folder / CFG_FILE, lambda p: p.write_text(json.dumps(out_cfg, indent=2)))
    return folder


def _atomic(target: pathlib.Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)
