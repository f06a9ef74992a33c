"""EleutherAI sparsify format (PyPI ``eai-sparsify``): one folder per hookpoint, each with
``cfg.json`` + ``sae.safetensors``; the run folder may hold a ``config.json`` (training config,
``model`` = model name).

Tensors (``SparseCoder`` state dict, docs/references.md "SAE file formats"):
``encoder.weight [num_latents, d_in]`` (an ``nn.Linear``, so ``W_enc = encoder.weight.T``),
``encoder.bias [num_latents]``, ``W_dec [num_latents, d_in]`` (already our orientation),
``b_dec [d_in]``; optional ``W_skip [d_in, d_in]``.
Config: ``d_in`` (written by ``save_to_disk``), ``num_latents`` (0 means ``d_in *
expansion_factor``), ``k``, ``activation`` (topk | groupmax), ``transcode``,
``skip_connection``, ``normalize_decoder`` (training only).

Forward (``SparseCoder.encode`` / ``decode``): ``x - b_dec`` unless ``transcode`` (sparsify
always subtracts ``b_dec`` for autoencoders, whatever ``normalize_decoder`` says: SAELens
6.54's converter wrongly ties the two), ``pre = relu(x @ encoder.weight.T + encoder.bias)``,
the k largest of ``pre`` (unsorted), ``x_hat = sum_j acts_j W_dec[idx_j] + b_dec``. That is the
SAE type's ``topk`` activation with ``apply_b_dec_to_input = not transcode``.

Refused: ``groupmax`` activation, a non-zero skip connection, and the experimental
``embed_skip`` / ``gram_lookup`` options (their forward needs inputs the SAE type lacks).
When ``d_in == num_latents`` the shapes cannot tell the orientation; the ``nn.Linear``
convention of ``encoder.weight`` (``[out, in]``) decides.
"""

from __future__ import annotations

import pathlib

import numpy as np

from models import sae as sae_lib
from models.formats import _common as C
from models.formats._common import InputError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG = "config.json"


def sparsify_hookpoints(path: C.PathLike) -> list[str]:
    """Hookpoint folder names under a sparsify run folder (sorted), empty if none."""
    root = pathlib.Path(path)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and (p / CFG_FILE).is_file() and not (p / "sae_weights.safetensors").exists()
    )


def _resolve(path: pathlib.Path, hookpoint: str | None) -> pathlib.Path:
    """The hookpoint folder: ``path`` itself, or ``path/hookpoint`` in a run folder."""
    if path.is_file():
        path = path.parent
    if (path / CFG_FILE).is_file():
        if hookpoint is not None and path.name != hookpoint and (path / hookpoint).is_dir():
            return path / hookpoint
        return path
    available = sparsify_hookpoints(path)
    if hookpoint is not None:
        if hookpoint in available:
            return path / hookpoint
        raise InputError(f"sparsify run {path}: no hookpoint {hookpoint!r}; available: {available}")
    if len(available) == 1:
        return path / available[0]
    if not available:
        raise InputError(
            f"sparsify SAE {path}: missing file {path / CFG_FILE} and no "
            f"hookpoint folders (each needs {CFG_FILE} + {WEIGHTS_FILE})"
        )
    raise InputError(
        f"sparsify run {path} holds {len(available)} hookpoints; pass hookpoint= one of {available}"
    )


def load_sparsify(
    path: C.PathLike,
    hookpoint: str | None = None,
    *,
    model_name: str | None = None,
    allow_transposed: bool = True,
    record_provenance: bool = True,
) -> sae_lib.SAE:
    """Loads one sparsify sparse coder into the SAE type.

    Args:
      path: a hookpoint folder (``cfg.json`` + ``sae.safetensors``), or a run folder holding
        hookpoint folders (then ``hookpoint`` picks one; optional when there is only one).
      hookpoint: folder name such as ``layers.6`` (block 6's output = ``resid_post.6``).
      model_name: overrides the run's ``config.json`` ``model`` (provenance only).
      allow_transposed: accept a matrix stored in the other orientation when the shape says
        so unambiguously (recorded in metadata); False refuses it.
      record_provenance: add format / source path / hookpoint / model to the metadata.
    """
    folder = _resolve(pathlib.Path(path), hookpoint)
    what = f"sparsify SAE {folder}"
    cfg = C.read_json(folder / CFG_FILE, what)
    tensors, _ = C.read_safetensors(folder / WEIGHTS_FILE, what)

    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise InputError(
            f"{what}: activation {activation!r} is not supported (the SAE type "
            f"has topk, not per-group maxima); expected 'topk'"
        )
    for flag in ("embed_skip", "gram_lookup", "signed"):
        if cfg.get(flag):
            raise InputError(
                f"{what}: {flag}=True is not supported (its forward needs "
                f"inputs or signs the SAE type does not have)"
            )
    if "b_dec" not in tensors:
        raise InputError(f"{what}: missing tensor 'b_dec'; found {sorted(tensors)}")
    if "d_in" in cfg:
        d_in = C.config_int(cfg, "d_in", what)
    else:  # very old cfg.json files: b_dec is [d_in] and unambiguous
        d_in = int(np.shape(tensors["b_dec"])[0])
    num_latents = C.config_int(cfg, "num_latents", what, minimum=0, default=0)
    if num_latents == 0:
        num_latents = d_in * C.config_int(cfg, "expansion_factor", what, default=32)
    k = C.config_int(cfg, "k", what, default=32)
    dims = f"cfg.json (d_in={d_in}, num_latents={num_latents})"

    C.check_keys(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], {"W_skip"}, what)
    if "W_skip" in tensors:
        w_skip = np.asarray(C.matrix(tensors, "W_skip", d_in, d_in, what, dims))
        if np.any(w_skip != 0):
            raise InputError(
                f"{what}: non-zero skip connection W_skip is not supported (the "
                f"SAE type has no x @ W_skip term)"
            )
    transposed: list[str] | None = [] if allow_transposed else None
    # encoder.weight is an nn.Linear weight [out=num_latents, in=d_in]: W_enc is its transpose.
    enc = C.matrix(tensors, "encoder.weight", num_latents, d_in, what, dims, transposed)
    arrays = {
        "W_enc": np.asarray(enc).T,
        "b_enc": C.vector(tensors, "encoder.bias", num_latents, what, dims),
        "W_dec": C.matrix(tensors, "W_dec", num_latents, d_in, what, dims, transposed),
        "b_dec": C.vector(tensors, "b_dec", d_in, what, dims),
    }
    transcode = bool(cfg.get("transcode", False))
    sae_cfg = C.make_config(
        what,
        d_in=d_in,
        d_sae=num_latents,
        activation="topk",
        k=k,
        apply_b_dec_to_input=not transcode,
    )

    run_cfg = {}
    if (folder.parent / RUN_CONFIG).is_file():
        run_cfg = C.read_json(folder.parent / RUN_CONFIG, f"sparsify run {folder.parent}")
    model = model_name or run_cfg.get("model")
    prov = C.provenance(
        "sparsify",
        folder,
        hookpoint or folder.name,
        model,
        transcoder=transcode or None,
        dataset=run_cfg.get("dataset") if isinstance(run_cfg.get("dataset"), str) else None,
        expansion_factor=cfg.get("expansion_factor"),
        transposed_on_load=transposed or None,
    )
    return C.build(sae_cfg, arrays, prov, what, record_provenance)
