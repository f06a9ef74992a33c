"""Gemma Scope format: ``params.npz`` in folders such as
``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/`` (no config file).

Arrays (docs/references.md "SAE file formats"): ``W_enc [d_model, d_sae]``, ``W_dec [d_sae,
d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``, ``threshold [d_sae]`` (some copies spell
the matrices ``w_enc`` / ``w_dec``). Forward (the Gemma Scope tutorial's JumpReLU SAE):
``pre = x @ W_enc + b_enc`` (b_dec is NOT subtracted), ``acts = (pre > threshold) *
relu(pre)``, ``x_hat = acts @ W_dec + b_dec``: the SAE type's ``jumprelu`` with
``apply_b_dec_to_input=False``.

There is no config, so ``d_in`` comes from ``b_dec`` and ``d_sae`` from ``b_enc`` (both 1-D,
unambiguous) and the matrices are checked against them; pass ``d_in`` / ``d_sae`` to check
against what you expect. Layer, site, width and model are read from the path when it follows
the release layout (``layer_L``, ``-res`` = ``blocks.L.hook_resid_post`` = ``resid_post.L``).
The arrays are used as stored: SAELens rescales the *embedding* SAEs for TransformerLens's
unscaled ``hook_embed``; HF's ``hidden_states[0]`` already includes Gemma's sqrt(d_model)
embedding scale, so no rescaling is applied here.

The file is read with ``np.load(allow_pickle=False)``: object arrays are refused.
"""

from __future__ import annotations

import pathlib
import re
import zipfile
import zlib

import numpy as np

from models import sae as sae_lib
from models.formats import _common as C
from models.formats._common import InputError

PARAMS_FILE = "params.npz"
_KEYS = {
    "w_enc": "W_enc",
    "w_dec": "W_dec",
    "b_enc": "b_enc",
    "b_dec": "b_dec",
    "threshold": "threshold",
}


def _read_npz(path: pathlib.Path, what: str) -> dict[str, np.ndarray]:
    C.require_file(path, what)
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":  # every .npz is a zip archive; np.load would call garbage "pickled"
        raise InputError(
            f"{what}: {path} is not an .npz archive ("
            + ("empty file" if not head else "no zip header: garbage, text or a single .npy?")
            + ")"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise InputError(
                    f"{what}: {path} holds a single array, expected an .npz archive of named arrays"
                )
            return {name: np.asarray(data[name]) for name in data.files}
    except InputError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise InputError(
                f"{what}: {path} holds object (pickled) arrays; refused (only "
                f"plain numeric arrays are read, never pickles)"
            ) from None
        raise InputError(
            f"{what}: {path} is not a readable .npz archive ({str(e).splitlines()[0]})"
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise InputError(
            f"{what}: {path} is truncated or not an .npz archive ({e.__class__.__name__})"
        ) from None


def parse_release_path(path: C.PathLike) -> dict:
    """Layer / site / width / L0 / model read from a Gemma Scope release path (may be empty)."""
    text = pathlib.Path(path).as_posix()
    out: dict = {}
    m = re.search(r"layer_(\d+)", text)
    if m:
        out["layer"] = int(m.group(1))
    m = re.search(r"gemma-scope-(\d+(?:\.\d+)?b)-(pt|it)-(res|mlp|att)", text)
    if m:
        size, kind, site = m.groups()
        out["model_name"] = f"gemma-2-{size}" + ("-it" if kind == "it" else "")
        out["site"] = site
    m = re.search(r"width_(\w+?)(?:/|$)", text)
    if m:
        out["width"] = m.group(1)
    m = re.search(r"average_l0_(\d+)", text)
    if m:
        out["average_l0"] = int(m.group(1))
    if "layer" in out and out.get("site") in ("res", "mlp", "att"):
        out["hookpoint"] = {
            "res": "blocks.{}.hook_resid_post",
            "mlp": "blocks.{}.hook_mlp_out",
            "att": "blocks.{}.attn.hook_z",
        }[out["site"]].format(out["layer"])
    return out


def load_gemma_scope(
    path: C.PathLike,
    *,
    d_in: int | None = None,
    d_sae: int | None = None,
    hookpoint: str | None = None,
    model_name: str | None = None,
    allow_transposed: bool = True,
    record_provenance: bool = True,
) -> sae_lib.SAE:
    """Loads a Gemma Scope ``params.npz`` (or the folder holding it) into the SAE type.

    Args:
      path: the ``params.npz`` file or its folder.
      d_in, d_sae: expected sizes to check (default: taken from ``b_dec`` / ``b_enc``).
      hookpoint, model_name: provenance overrides (default: parsed from the release path).
      allow_transposed: accept a matrix stored in the other orientation when the shape says
        so unambiguously (recorded in metadata); False refuses it.
      record_provenance: add format / source path / hookpoint / model to the metadata.
    """
    file = pathlib.Path(path)
    if file.is_dir():
        file = file / PARAMS_FILE
    what = f"Gemma Scope SAE {file}"
    raw = _read_npz(file, what)
    tensors = {}
    for name, arr in raw.items():
        key = _KEYS.get(name.lower(), name)
        if key in tensors:
            raise InputError(f"{what}: both spellings of {key!r} present")
        tensors[key] = arr
    C.check_keys(tensors, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], (), what)
    for key in ("b_enc", "b_dec"):
        if np.ndim(tensors[key]) != 1:
            raise InputError(f"{what}: {key!r} must be 1-D, got shape {np.shape(tensors[key])}")
    n_in, n_sae = int(tensors["b_dec"].shape[0]), int(tensors["b_enc"].shape[0])
    if d_in is not None and d_in != n_in:
        raise InputError(f"{what}: b_dec has {n_in} entries, expected d_in={d_in}")
    if d_sae is not None and d_sae != n_sae:
        raise InputError(f"{what}: b_enc has {n_sae} entries, expected d_sae={d_sae}")
    dims = f"b_dec / b_enc lengths (d_in={n_in}, d_sae={n_sae})"
    transposed: list[str] | None = [] if allow_transposed else None
    arrays = {
        "W_enc": C.matrix(tensors, "W_enc", n_in, n_sae, what, dims, transposed),
        "b_enc": tensors["b_enc"],
        "W_dec": C.matrix(tensors, "W_dec", n_sae, n_in, what, dims, transposed),
        "b_dec": tensors["b_dec"],
        "threshold": C.vector(tensors, "threshold", n_sae, what, dims),
    }
    sae_cfg = C.make_config(
        what, d_in=n_in, d_sae=n_sae, activation="jumprelu", apply_b_dec_to_input=False
    )
    info = parse_release_path(file)
    prov = C.provenance(
        "gemma_scope",
        file,
        hookpoint or info.get("hookpoint"),
        model_name or info.get("model_name"),
        layer=info.get("layer"),
        width=info.get("width"),
        average_l0=info.get("average_l0"),
        transposed_on_load=transposed or None,
    )
    return C.build(sae_cfg, arrays, prov, what, record_provenance)
