"""SAE file formats people publish, loaded into the ONE SAE type (`models.sae.SAE`).

``load_sae(path)`` picks the format from the files present; the explicit loaders take the same
path plus format-specific options. Formats are registered (`REGISTRY`, `register`): a new
format is one file with its loader plus one ``register(Format(...))`` line at the end of this
module, naming the files that identify it. Every loader checks each tensor's shape against the
config (orientation is decided by shape against the config, never by the tensor's name; when
``d_in == d_sae`` the format's documented layout decides), refuses NaN/Inf weights, unknown
architectures and files that need unpickling, and records provenance in
``SAEConfig.metadata``: ``format``, ``source_path``, ``hookpoint`` (the library's own name),
``canonical_hookpoint`` (``resid_post.L`` etc. when derivable), ``model_name``, plus
format details. Sources: docs/references.md ("SAE file formats" and "Layers and
hookpoints").

Formats (stored layouts; ``d`` = d_in = d_model, ``n`` = d_sae = num_latents = dict_size):

=================== ============================ ================================ ==============
format              files                        tensors as stored                SAE type
=================== ============================ ================================ ==============
SAELens v6 / <6.0   ``cfg.json``,                ``W_enc [d,n]``, ``b_enc [n]``,  standard: relu
                    ``sae_weights.safetensors``, ``W_dec [n,d]``, ``b_dec [d]``,  topk: topk(k)
                    optional                     ``threshold [n]`` (jumprelu;     jumprelu
                    ``sparsity.safetensors``     ``log_threshold`` /              batchtopk,
                    (log10 feature density)      ``topk_threshold`` in training   matryoshka_*:
                                                 checkpoints)                     batchtopk
sparsify            ``<hookpoint>/cfg.json``,    ``encoder.weight [n, d]``        topk(k)
(``eai-sparsify``)  ``<hookpoint>/               (nn.Linear), ``encoder.bias``,
                    sae.safetensors``, run       ``W_dec [n, d]``, ``b_dec [d]``
                    ``config.json``
Gemma Scope         ``params.npz``               ``W_enc [d,n]``, ``W_dec [n,d]``,  jumprelu
                                                 ``b_enc``, ``b_dec``, ``threshold``
dictionary_learning ``ae.pt`` (state dict) +     AutoEncoder: ``encoder.weight    relu / jumprelu
                    ``config.json``              [n, d]``, ``encoder.bias``,      / topk(k) /
                    (``trainer.dict_class``,     ``decoder.weight [d, n]``,       batchtopk
                    ``activation_dim``,          ``bias [d]``; JumpRelu:          (per class)
                    ``dict_size``, ``k``)        ``W_enc [d, n]``, ``W_dec``,
                                                 ``threshold``; TopK / BatchTopK:
                                                 ``encoder.*``, ``decoder.weight``,
                                                 ``b_dec``, buffers ``k``,
                                                 ``threshold``
=================== ============================ ================================ ==============

Conventions the loaders apply (details in each module's docstring):

* ``apply_b_dec_to_input``: SAELens from cfg.json; sparsify always (``not transcode``; never
  from ``normalize_decoder``); Gemma Scope never; dictionary_learning per class.
* SAELens ``rescale_acts_by_decoder_norm`` and dictionary_learning JumpReLU's decoder-norm
  scaling are folded into the weights; SAELens pre-6.0 ``finetuning_scaling_factor`` is folded
  into ``W_dec``; ``expected_average_only_in`` with a known factor becomes ``input_scale``.
* sparsify ``num_latents = 0`` means ``d_in * expansion_factor``.

Writing: `save_saelens` (SAELens v6 layout that SAELens can load, plus an exact-config block;
``load_saelens(save_saelens(path, sae))`` is bit-identical; an ``input_scale`` is folded into
the written weights, because SAELens does not apply it at inference). The project's native orbax
format
(``sae_config.json`` + ``params/``) is written and read by ``models/sae_io_native.py``;
``load_sae`` recognises it too (format ``native``).

Refused with a one-line `engine.checks.InputError`: missing files, truncated or malformed
safetensors / npz / torch files, pickle-only ``.pt`` files and object ``.npz`` arrays, unknown
or unsupported architectures (gated, transcoders, groupmax, skip connections, per-token input
normalisation unless ``ignore_runtime_norm``), shapes that do not fit the config, unexpected
tensors, NaN/Inf weights.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

from models import sae as sae_lib
from models.formats import _common
from models.formats._common import InputError, canonical_hookpoint
from models.formats.dictionary_learning import load_dictionary_learning
from models.formats.gemma_scope import load_gemma_scope, parse_release_path
from models.formats.saelens import load_saelens, read_saelens_sparsity, save_saelens
from models.formats.sparsify import load_sparsify, sparsify_hookpoints


def _load_native(path: _common.PathLike, **kwargs) -> sae_lib.SAE:
    """The project's own orbax format; it keeps its metadata exactly, so no options."""
    if kwargs:
        raise InputError(f"load_sae: the native format takes no options, got {sorted(kwargs)}")
    from models import sae_io_native  # orbax is heavy: import only when needed

    p = pathlib.Path(path)
    return sae_io_native.load_sae(str(p.parent if p.is_file() else p))


@dataclasses.dataclass(frozen=True)
class Format:
    """A registered SAE file format.

    Attributes:
      name: registry key (``load_sae(path, format=name)``).
      load: ``load(path, **options) -> SAE``.
      describe: what its files look like, for error messages.
      files: file names that identify it in a folder (or when given as the path).
      suffixes: a file path ending so is this format.
      fallback: weaker evidence ``fallback(folder) -> bool``, tried only when no format's
        ``files`` matched (e.g. a ``cfg.json`` whose weights file is missing).
    """

    name: str
    load: Callable[..., sae_lib.SAE]
    describe: str
    files: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    fallback: Callable[[pathlib.Path], bool] | None = None


#: Registered formats, in detection order.
REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Adds ``fmt`` (detected after those registered before it; a taken name is refused).

    A new format is one file (its loader into `models.sae.SAE`, using `_common`'s checked
    readers) plus one ``register(Format(...))`` line here.
    """
    if fmt.name in REGISTRY:
        raise InputError(f"SAE format {fmt.name!r} is already registered")
    REGISTRY[fmt.name] = fmt
    return fmt


# Files that belong to a folder of several formats: a path to one of them is detected from
# its folder.
_FOLDER_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "config.json")


def _expected() -> str:
    return ", ".join(f.describe for f in REGISTRY.values())


__all__ = [
    "FORMATS",
    "REGISTRY",
    "Format",
    "register",
    "InputError",
    "canonical_hookpoint",
    "detect_format",
    "load_sae",
    "load_saelens",
    "save_saelens",
    "read_saelens_sparsity",
    "load_sparsify",
    "sparsify_hookpoints",
    "load_gemma_scope",
    "parse_release_path",
    "load_dictionary_learning",
]


def _cfg_flavour(cfg_path: pathlib.Path) -> str | None:
    """Which library wrote a ``cfg.json`` whose weights file is missing (for a clear error)."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    if {"num_latents", "expansion_factor"} & set(cfg):
        return "sparsify"
    if {"architecture", "hook_name", "hook_point", "d_sae", "metadata"} & set(cfg):
        return "saelens"
    return None


def detect_format(path: _common.PathLike) -> str:
    """Names the format of an SAE file or folder (a `REGISTRY` key) from the files present."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(f"SAE path {p}: no such file or directory")
    if p.is_file():
        name = p.name
        if name not in _FOLDER_FILES:
            for fmt in REGISTRY.values():
                if name in fmt.files or (fmt.suffixes and name.endswith(fmt.suffixes)):
                    return fmt.name
            raise InputError(
                f"SAE path {p}: unknown SAE file {name!r}; expected one of {_expected()}"
            )
        p = p.parent
    files = {q.name for q in p.iterdir()}
    for fmt in REGISTRY.values():
        if files & set(fmt.files):
            return fmt.name
    for fmt in REGISTRY.values():
        if fmt.fallback is not None and fmt.fallback(p):
            return fmt.name  # its loader then names the missing weights file
    raise InputError(
        f"SAE path {p}: cannot tell the SAE format; expected {_expected()}; "
        f"found {sorted(files)[:12]}"
    )


def load_sae(path: _common.PathLike, format: str | None = None, **kwargs: Any) -> sae_lib.SAE:
    """Loads any supported SAE file or folder into `models.sae.SAE`.

    Args:
      path: file or folder (see the table in this module's docstring).
      format: a `REGISTRY` key to skip detection.
      **kwargs: passed to the format's loader (e.g. ``hookpoint=`` for a sparsify run folder,
        ``norm_scaling_factor=`` for SAELens, ``dict_class=`` for dictionary_learning,
        ``record_provenance=False``).
    """
    fmt = format or detect_format(path)
    if fmt not in REGISTRY:
        raise InputError(f"load_sae format: unknown {fmt!r}; expected one of {tuple(REGISTRY)}")
    return REGISTRY[fmt].load(path, **kwargs)


# Detection order: the project's own format first, then by the most specific weights file.
register(
    Format("native", _load_native, "native (sae_config.json + params/)", files=("sae_config.json",))
)
register(
    Format(
        "saelens",
        load_saelens,
        "SAELens (cfg.json + sae_weights.safetensors)",
        files=("sae_weights.safetensors",),
        fallback=lambda p: _cfg_flavour(p / "cfg.json") == "saelens",
    )
)
register(
    Format(
        "sparsify",
        load_sparsify,
        "sparsify (cfg.json + sae.safetensors, or hookpoint folders of them)",
        files=("sae.safetensors",),
        fallback=lambda p: (
            _cfg_flavour(p / "cfg.json") == "sparsify" or bool(sparsify_hookpoints(p))
        ),
    )
)
register(
    Format(
        "gemma_scope",
        load_gemma_scope,
        "Gemma Scope (params.npz)",
        files=("params.npz",),
        suffixes=(".npz",),
    )
)
register(
    Format(
        "dictionary_learning",
        load_dictionary_learning,
        "dictionary_learning (ae.pt [+ config.json])",
        files=("ae.pt",),
        suffixes=(".pt", ".pth"),
    )
)
#: The built-in formats (`REGISTRY` also holds any registered later).
FORMATS = tuple(REGISTRY)
