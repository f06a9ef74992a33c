"""Shared helpers of the SAE file-format loaders: safe file reading, shape/orientation checks,
provenance metadata and the hand-off to `models.sae.from_arrays`.

Everything here raises `engine.checks.InputError` with a one-line message that names the file
and what was expected (see docs/references.md, "SAE file formats": check shapes against
the config, do not trust tensor names for orientation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from engine import checks
from models import sae as sae_lib

InputError = checks.InputError
log = logging.getLogger(__name__)

PathLike = str | os.PathLike


# -- files --------------------------------------------------------------------------------------


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
    """Returns ``path`` or raises a one-line error naming the missing file and its role."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise InputError(f"{what}: missing file {path} (directory holds {present[:12]})")
    return path


def read_json(path: pathlib.Path, what: str) -> dict:
    """Reads a JSON object; missing, empty, malformed or non-object files raise InputError."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{what}: {path} is not valid JSON ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    if not isinstance(value, dict):
        raise InputError(f"{what}: {path} must hold a JSON object, got {type(value).__name__}")
    return value


# -- safetensors (read without pickle, bf16 included, truncation detected) -----------------------

# The safetensors layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian
# header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then
# the raw little-endian tensor bytes. numpy has no bfloat16, so BF16 is widened to float32
# exactly (its 16 bits are the top half of a float32).
_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: PathLike, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """Reads every tensor of a safetensors file as numpy arrays.

    Returns ``(tensors, header_metadata)``. BF16 is converted to float32 exactly. Raises
    InputError for a missing, truncated or malformed file, naming what is wrong.
    """
    path = pathlib.Path(path)
    require_file(path, what)
    size = path.stat().st_size
    if size < 8:
        raise InputError(
            f"{what}: {path} is truncated ({size} bytes; a safetensors file "
            f"starts with an 8-byte header length)"
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise InputError(
                f"{what}: {path} is truncated or not a safetensors file (header "
                f"length {n} but the file has {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(
            f"{what}: {path} is not a safetensors file (unreadable JSON header)"
        ) from None
    if not isinstance(header, dict):
        raise InputError(f"{what}: {path} is not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype_name, shape = info["dtype"], [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"{what}: {path}: malformed header entry for tensor {name!r}"
            ) from None
        if dtype_name not in _ST_DTYPES:
            raise InputError(
                f"{what}: {path}: tensor {name!r} has unsupported dtype "
                f"{dtype_name!r}; expected one of {sorted(_ST_DTYPES)}"
            )
        dtype = _ST_DTYPES[dtype_name]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or begin < 0 or end < begin:
            raise InputError(
                f"{what}: {path}: tensor {name!r} byte range [{begin}, {end}) does "
                f"not fit shape {tuple(shape)} of {dtype_name}"
            )
        if end > data_size:
            raise InputError(
                f"{what}: {path} is truncated: tensor {name!r} needs bytes up to "
                f"{data_start + end}, the file has {size}"
            )
        # Read into memory (not a memmap): arrays handed to JAX must not alias a file that a
        # later save could rewrite in place.
        arr = np.fromfile(path, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
        if dtype_name == "BF16":
            arr = (np.asarray(arr).astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out, dict(meta)


def write_safetensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes float/int numpy arrays with the reference `safetensors` library."""
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(path),
        metadata=dict(metadata) if metadata else None,
    )


# -- shapes and orientation ---------------------------------------------------------------------


def check_keys(
    tensors: Mapping[str, Any], required: Iterable[str], optional: Iterable[str], what: str
) -> None:
    """Missing required tensors or unknown extra tensors raise (an unknown tensor could change
    the forward pass, so it is never silently dropped)."""
    required, optional = list(required), set(optional)
    missing = [k for k in required if k not in tensors]
    if missing:
        raise InputError(f"{what}: missing tensor(s) {missing}; found {sorted(tensors)}")
    extra = sorted(set(tensors) - set(required) - optional)
    if extra:
        raise InputError(
            f"{what}: unexpected tensor(s) {extra}; this loader does not know how "
            f"they enter the forward pass (expected {required + sorted(optional)})"
        )


def vector(
    tensors: Mapping[str, np.ndarray], key: str, length: int, what: str, dims: str
) -> np.ndarray:
    """A 1-D tensor of ``length`` entries (``dims`` names where the length comes from)."""
    arr = np.asarray(tensors[key])
    if arr.shape != (length,):
        raise InputError(
            f"{what}: tensor {key!r} has shape {arr.shape}, expected ({length},) from {dims}"
        )
    return arr


def matrix(
    tensors: Mapping[str, np.ndarray],
    key: str,
    rows: int,
    cols: int,
    what: str,
    dims: str,
    transposed: list[str] | None = None,
) -> np.ndarray:
    """A 2-D tensor oriented ``[rows, cols]`` as the config says.

    Orientation is decided by the shape against the config, not by the tensor's name: when the
    file holds the transpose and ``rows != cols`` the transpose is taken (and recorded in
    ``transposed``; a converter that stored the other orientation, e.g. SAELens 6.54's sparsify
    converter, docs/references.md). Pass ``transposed=None`` to refuse transposes. When ``rows ==
    cols`` the shape cannot tell, and the format's documented orientation is used.
    """
    arr = tensors[key]
    shape = tuple(np.shape(arr))
    if shape == (rows, cols):
        return arr
    if shape == (cols, rows) and transposed is not None:
        log.warning(
            "%s: tensor %r stored as %s, transposed to [%d, %d] from %s",
            what,
            key,
            shape,
            rows,
            cols,
            dims,
        )
        transposed.append(key)
        return np.asarray(arr).T
    raise InputError(
        f"{what}: tensor {key!r} has shape {shape}, expected ({rows}, {cols}) from {dims}"
    )


def config_int(
    cfg: Mapping, key: str, what: str, minimum: int = 1, default: int | None = None
) -> int:
    """An integer config entry (floats with integral values accepted, e.g. 32.0)."""
    value = cfg.get(key, default)
    if value is None:
        raise InputError(f"{what}: config has no {key!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != int(value)
        or int(value) < minimum
    ):
        raise InputError(f"{what}: config {key!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def decoder_row_norms(w_dec: np.ndarray, what: str) -> np.ndarray:
    """Row norms of ``W_dec [d_sae, d_in]`` in float64; zero rows cannot be folded."""
    norms = np.linalg.norm(np.asarray(w_dec, np.float64), axis=1)
    if not np.all(norms > 0):
        bad = int(np.argmin(norms))
        raise InputError(f"{what}: decoder row {bad} has zero norm; cannot fold decoder norms")
    return norms


# -- hookpoints and provenance ------------------------------------------------------------------

_CANONICAL = [
    # SAELens / TransformerLens names: block outputs and inputs.
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post.{}"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre.{}"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out.{}"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out.{}"),
    # sparsify: module names; `layers.L` is the output of block L.
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)$"), "resid_post.{}"),
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.mlp$"), "mlp_out.{}"),
    (re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attention|attn)$"), "attn_out.{}"),
    # already canonical (models/lm.py names)
    (re.compile(r"^(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)$"), None),
    # dictionary_learning submodule names.
    (re.compile(r"^resid_post_layer_(\d+)$"), "resid_post.{}"),
    (re.compile(r"^mlp_out_layer_(\d+)$"), "mlp_out.{}"),
    (re.compile(r"^attn_out_layer_(\d+)$"), "attn_out.{}"),
]


def canonical_hookpoint(name: str | None) -> str | None:
    """Maps a library's hookpoint name to this project's explicit name, or None.

    SAELens ``blocks.L.hook_resid_post`` and sparsify ``layers.L`` are both the OUTPUT of block
    L = ``resid_post.L`` = HF ``hidden_states[L + 1]`` (docs/references.md, "Layers and
    hookpoints": HF hidden_states is off by one against both libraries).
    """
    if not name:
        return None
    for pattern, template in _CANONICAL:
        m = pattern.match(name)
        if m and template is None:
            return f"{m.group(1)}.{int(m.group(2))}"
        if m:
            return template.format(int(m.group(1)))
    return None


def _jsonable(value):
    """Metadata values must be hashable and JSON-friendly (SAEConfig is a static field)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def provenance(
    fmt: str, path: pathlib.Path, hookpoint: str | None, model_name: str | None, **extra: Any
) -> dict:
    """The provenance keys every loader records (format, source path, hookpoint, model)."""
    meta = {"format": fmt, "source_path": str(pathlib.Path(path).resolve())}
    if hookpoint:
        meta["hookpoint"] = str(hookpoint)
        canon = canonical_hookpoint(str(hookpoint))
        if canon:
            meta["canonical_hookpoint"] = canon
    if model_name:
        meta["model_name"] = str(model_name)
    meta.update({k: _jsonable(v) for k, v in extra.items() if v is not None})
    return meta


def build(
    cfg: sae_lib.SAEConfig,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping,
    what: str,
    record_provenance: bool = True,
) -> sae_lib.SAE:
    """Checks finiteness/shapes and builds the SAE through `models.sae.from_arrays`."""
    if record_provenance and meta:
        cfg = cfg.with_metadata(**dict(meta))
    return sae_lib.from_arrays(
        cfg,
        arrays["W_enc"],
        arrays["b_enc"],
        arrays["W_dec"],
        arrays["b_dec"],
        arrays.get("threshold"),
        name=what,
    )


def make_config(what: str, **fields: Any) -> sae_lib.SAEConfig:
    """`SAEConfig(**fields)` with the config's own InputError prefixed by the file."""
    try:
        return sae_lib.SAEConfig(**fields)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
